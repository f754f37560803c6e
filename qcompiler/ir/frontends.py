"""Frontends: every supported model form becomes one ``onnx_ir.Model``."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveInitializersFromInputsPass

from qcompiler.errors import ModelLoadError
from qcompiler.logs import third_party_routed
from qcompiler.progress import step

logger = logging.getLogger(__name__)

ModelLike = Any  # torch.nn.Module | str | os.PathLike | onnx.ModelProto | ir.Model


def load(
    model: ModelLike,
    example_inputs: Sequence[Any] | None = None,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    progress: bool = False,
) -> ir.Model:
    """Load ``model`` into an ``onnx_ir.Model`` with Constant nodes lifted to initializers.

    Args:
        model: a ``torch.nn.Module`` (captured with torch.export through ``torch.onnx.export(dynamo=True)``),
            a path to an ONNX file (external data next to it is read), an ``onnx.ModelProto`` or an
            ``onnx_ir.Model`` (used as is, not copied; initializers in external data files are read into memory,
            since the passes rewrite them and onnxruntime runs the model from memory).
        example_inputs: positional example inputs, required for a ``torch.nn.Module``.
        dynamic_shapes: forwarded to ``torch.onnx.export`` for a ``torch.nn.Module``.
        progress: one line for the torch export (seconds to minutes).

    Raises:
        ModelLoadError: the file is missing or malformed, or the module cannot be exported.
    """
    if isinstance(model, ir.Model):
        result = ir.external_data.load_to_model(model)
    elif isinstance(model, onnx.ModelProto):
        result = ir.serde.deserialize_model(model)
    elif isinstance(model, str | os.PathLike):
        result = _load_file(Path(model))
    elif _is_torch_module(model):
        with step(f"export {type(model).__name__} (torch.export)", progress):
            result = _export_torch(model, example_inputs, dynamic_shapes)
    else:
        raise ModelLoadError(
            f"model: cannot load an object of type {type(model).__name__}; pass a torch.nn.Module, "
            "a path to an .onnx file, an onnx.ModelProto or an onnx_ir.Model"
        )
    RemoveInitializersFromInputsPass()(result)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(result)
    _unknown_dims_as_symbols(result)
    return result


def _unknown_dims_as_symbols(model: ir.Model) -> None:
    """Some exporters (Paddle2ONNX) write an unknown dimension as ``-1``: make it a symbolic dimension, which is
    what the rest of the pipeline (calibration's shape checks, shape inference) understands as dynamic."""
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.shape is not None and any(isinstance(d, int) and d < 0 for d in value.shape):
            value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in value.shape])


def _load_file(path: Path) -> ir.Model:
    if not path.is_file():
        raise ModelLoadError(f"model: no such ONNX file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for bad files
        raise ModelLoadError(
            f"model: {path} is not a readable ONNX file ({type(exc).__name__}: {exc}); "
            "re-export it or check that its external data files sit next to it"
        ) from exc
    if not proto.graph.node:
        raise ModelLoadError(f"model: {path} holds no graph nodes; is it an ONNX model file?")
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"model: {path} is malformed ONNX: {exc}") from exc


def _is_torch_module(model: object) -> bool:
    torch = sys.modules.get("torch")  # a module of torch's exists only once torch is imported: never import it here
    return torch is not None and isinstance(model, torch.nn.Module)


def _export_torch(module: Any, example_inputs: Sequence[Any] | None, dynamic_shapes: Any) -> ir.Model:
    import torch

    if example_inputs is None:
        raise ModelLoadError("example_inputs: required to capture a torch.nn.Module with torch.export")
    args = tuple(example_inputs) if isinstance(example_inputs, list | tuple) else (example_inputs,)
    module = module.eval()
    try:
        with torch.no_grad(), third_party_routed():  # the exporter's own warnings are not the user's to act on
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=dynamic_shapes, optimize=True, verbose=False
            )
    except Exception as exc:
        raise ModelLoadError(f"model: torch.export of {type(module).__name__} failed: {exc}") from exc
    if program is None:
        raise ModelLoadError(f"model: torch.onnx.export returned nothing for {type(module).__name__}")
    logger.info("captured %s with torch.export", type(module).__name__)
    return program.model
