"""Configuration as frozen dataclasses that validate themselves, and recipes loaded from TOML."""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from qcompiler.errors import RecipeError
from qcompiler.passes.quantize.fake import FakeQuantConfig
from qcompiler.passes.quantize.qdq import QuantizeConfig
from qcompiler.passes.quantize.weights import WeightQuantSpec

OBSERVERS = ("minmax", "percentile", "mse")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    observer: str = "minmax"
    percentile: float = 99.99
    max_batches: int | None = None

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer: {self.observer!r} is not one of {OBSERVERS}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile: {self.percentile} is outside (0, 100]")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches: {self.max_batches} must be >= 1")


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """A pass by registry name with its options."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from qcompiler.registry import PASSES

        if self.name not in PASSES:
            raise ValueError(f"pass: unknown pass {self.name!r}; known passes: {sorted(PASSES)}")
        try:  # the options checked against the pass's constructor now, not when a compile reaches the pass
            inspect.signature(PASSES[self.name]).bind(**self.options)
        except TypeError as exc:
            raise ValueError(f"pass {self.name!r}: options {dict(self.options)} do not fit it ({exc})") from exc

    def build(self) -> Any:
        from qcompiler.registry import PASSES

        return PASSES[self.name](**self.options)


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    canonicalize: tuple[PassSpec, ...]
    calibration: CalibrationConfig
    quantize: QuantizeConfig
    lower: tuple[PassSpec, ...]
    #: a float-simulation recipe (``[simulate]``: low-bit weights, per-token activations) instead of the
    #: integer path; run by :func:`qcompiler.simulate`
    simulate: FakeQuantConfig | None = None
    #: ``[auto]``: architecture kind (qcompiler.ir.analysis.architecture) -> the built-in recipe to use for it;
    #: empty for a recipe that is used as it is
    auto: tuple[tuple[str, str], ...] = ()

    def choose(self, kind: str) -> Recipe:
        """The recipe ``[auto]`` maps ``kind`` to (this recipe when it has no ``[auto]`` table)."""
        if not self.auto:
            return self
        table = dict(self.auto)
        if kind not in table:
            raise RecipeError(f"recipe {self.name}: [auto] has no entry for the kind {kind!r}; kinds are {AUTO_KINDS}")
        return load_recipe(table[kind])


def _simulate_config(data: Mapping[str, Any]) -> FakeQuantConfig:
    """``[simulate]``: weight_bits, group_size (0: per channel), symmetric, clip_grid, clip_objective,
    weight_quantizer, activation_bits (0: float activations), activation_clip, gptq_damp, gptq_act_order; or a
    number format (passes/quantize/formats.py) for either side: weight_format (with export_weights),
    activation_format."""
    fields = dict(data)
    known = {"weight_bits", "group_size", "symmetric", "clip_grid", "clip_objective", "weight_quantizer",
             "activation_bits", "activation_clip", "gptq_damp", "gptq_act_order", "weight_format",
             "activation_format", "export_weights"}  # fmt: skip
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"simulate: unknown keys {unknown}; known: {sorted(known)}")
    group = int(fields.pop("group_size", 128))
    weight = WeightQuantSpec(
        bits=int(fields.pop("weight_bits", 4)),
        group_size=group or None,
        symmetric=bool(fields.pop("symmetric", True)),
        clip_grid=tuple(float(r) for r in fields.pop("clip_grid", ())),
        clip_objective=str(fields.pop("clip_objective", "weight")),
    )
    activation_bits = int(fields.pop("activation_bits", 0 if "activation_format" in fields else 8))
    return FakeQuantConfig(weight=weight, activation_bits=activation_bits or None, **fields)


#: the architecture kinds an ``[auto]`` table maps (qcompiler.ir.analysis.architecture.Architecture.kind)
AUTO_KINDS = ("causal-decoder", "depthwise-attention", "attention", "depthwise-cnn", "other")
#: kinds an ``[auto]`` table may leave out, and the kind whose recipe they then take
AUTO_FALLBACKS = {"depthwise-attention": "attention"}


def _auto_table(data: Mapping[str, Any], canonicalize: tuple[PassSpec, ...], where: str) -> tuple[tuple[str, str], ...]:
    """``[auto]``: every kind maps to a built-in integer-path recipe whose canonicalize list is this recipe's (the
    graph is canonicalized once, before the choice); a kind of :data:`AUTO_FALLBACKS` left out takes its
    fallback's recipe."""
    data = {**{k: data[v] for k, v in AUTO_FALLBACKS.items() if k not in data and v in data}, **data}
    missing = [k for k in AUTO_KINDS if k not in data]
    unknown = sorted(set(data) - set(AUTO_KINDS))
    if missing or unknown:
        raise RecipeError(f"recipe {where}: [auto] needs the kinds {list(AUTO_KINDS)} (optional: "
                          f"{sorted(AUTO_FALLBACKS)}); missing {missing}, unknown {unknown}")  # fmt: skip
    for kind in AUTO_KINDS:
        target = load_recipe(str(data[kind]))
        if target.auto or target.simulate is not None:
            raise RecipeError(f"recipe {where}: [auto] {kind} = {data[kind]!r} must be an integer-path recipe")
        if target.canonicalize != canonicalize:
            raise RecipeError(
                f"recipe {where}: [auto] {kind} = {data[kind]!r} canonicalizes differently; give both the same list"
            )
    return tuple((kind, str(data[kind])) for kind in AUTO_KINDS)


#: the top-level keys and sections of a recipe file
RECIPE_KEYS = frozenset({"name", "description", "canonicalize", "calibration", "quantize", "lower", "simulate", "auto"})


def builtin_recipes() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml") for p in resources.files("qcompiler.recipes").iterdir() if p.name.endswith(".toml")
    )


def _pass_specs(entries: Sequence[Any], where: str) -> tuple[PassSpec, ...]:
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            specs.append(PassSpec(entry))
        elif isinstance(entry, Mapping) and "pass" in entry:
            options = {k: v for k, v in entry.items() if k != "pass"}
            specs.append(PassSpec(str(entry["pass"]), options))
        else:
            raise RecipeError(f"recipe {where}: entry {entry!r} is neither a pass name nor {{pass = ...}}")
    return tuple(specs)


def load_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A built-in recipe by name (``w8a8``) or a TOML file by path.

    Raises:
        RecipeError: unknown name, unreadable file, or invalid content (names the field).
    """
    if isinstance(recipe, Recipe):
        return recipe
    path = Path(recipe)
    if path.suffix == ".toml" and path.is_file():
        text = path.read_text()
        where = str(path)
    elif str(recipe) in builtin_recipes():
        text = resources.files("qcompiler.recipes").joinpath(f"{recipe}.toml").read_text()
        where = str(recipe)
    else:
        raise RecipeError(
            f"recipe: unknown recipe {str(recipe)!r}; built-in recipes are {builtin_recipes()}, "
            "or pass the path of a .toml file"
        )
    try:
        data = tomllib.loads(text)
        unknown = sorted(set(data) - RECIPE_KEYS)
        if unknown:  # a misspelt section ([quantise]) would otherwise leave the recipe on its defaults
            raise RecipeError(f"recipe {where}: unknown key(s) {unknown}; a recipe has {sorted(RECIPE_KEYS)}")
        canonicalize = _pass_specs(data.get("canonicalize", []), f"{where}: canonicalize")
        return Recipe(
            name=str(data.get("name", where)),
            description=str(data.get("description", "")),
            canonicalize=canonicalize,
            calibration=CalibrationConfig(**data.get("calibration", {})),
            quantize=QuantizeConfig(**data.get("quantize", {})),
            lower=_pass_specs(data.get("lower", []), f"{where}: lower"),
            simulate=_simulate_config(data["simulate"]) if "simulate" in data else None,
            auto=_auto_table(data["auto"], canonicalize, where) if "auto" in data else (),
        )
    except RecipeError:
        raise
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
        raise RecipeError(f"recipe {where}: {exc}") from exc
