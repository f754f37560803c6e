"""Graph analyses the passes share: softmax groups, SiLU groups, and what kind of model a graph is."""

from __future__ import annotations
