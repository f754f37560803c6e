"""Weights as parameters of the compiled code, and one file of them shared by several libraries.

TVM embeds a Relax module's constants in its library; loading it deserializes them through several buffers
(measured on SmolLM2: a 172 MB library raised peak memory by 670 MB), and two libraries of one model (a causal
LM's prefill and decode) hold two copies. :func:`lift_constants` turns the large constants of ``main`` into
parameters after the kernels are scheduled, so the library holds code only; :func:`share_params` makes equal
parameters of several modules one TVM tensor; :func:`write_params` stores them once each (by content) in one file,
64-byte aligned, and :func:`read_params` reads each straight into its tensor.

The tensors are TVM's own, not numpy memory handed over by DLPack: a DLPack view of numpy weights passed to the
VM crashed the process at a later compile (measured; the cause inside TVM was not found).

Deliberately no import of the compiler here beyond the Relax mutator (:func:`lift_constants` runs at build time);
reading runs in a runtime-only process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: constants of at least this many bytes become parameters (scales, shifts and small tables stay in the code)
LIFT_MIN_BYTES = 4096
#: start alignment of every array in the parameter file (TVM's kernels assume 64-byte aligned tensors)
PARAM_ALIGNMENT = 64


def lift_constants(mod: Any, min_bytes: int = LIFT_MIN_BYTES) -> tuple[Any, list[np.ndarray]]:
    """``mod`` with every constant of ``main`` of at least ``min_bytes`` bytes made a parameter, appended after the
    inputs in first-use order, and the arrays of those parameters (one parameter per distinct constant object)."""
    import tvm
    from tvm import relax

    arrays: list[np.ndarray] = []

    @relax.expr_functor.mutator
    class Lift(relax.PyExprMutator):
        def __init__(self) -> None:
            super().__init__(mod)
            self.lifted: dict[Any, relax.Var] = {}

        def visit_generic_const_(self, op: Any) -> Any:  # a constant tensor (relax.const)
            data = op.value
            if not isinstance(data, tvm.runtime.Tensor):
                return op
            nbytes = int(np.prod([int(d) for d in data.shape])) * np.dtype(str(data.dtype)).itemsize
            if nbytes < min_bytes:
                return op
            var = self.lifted.get(op)
            if var is None:
                var = self.lifted[op] = relax.Var(f"param_{len(arrays)}", op.ty)
                arrays.append(data.numpy())
            return var

    main = mod["main"]
    lifter = Lift()
    body = lifter.visit_expr(main.body)
    if not arrays:
        return mod, arrays
    lifted = relax.Function(
        [*main.params, *lifter.lifted.values()], body, main.ret_ty, main.is_pure, main.attrs, main.span
    )
    mod["main"] = lifted
    return mod, arrays


def _digest(array: np.ndarray) -> str:
    digest = hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data, digest_size=16)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    return digest.hexdigest()


def host_array(param: Any) -> np.ndarray:
    """A parameter (numpy array or TVM tensor) as a numpy array."""
    return param if isinstance(param, np.ndarray) else param.numpy()


def write_params(path: str | Path, modules: Sequence[Sequence[Any]]) -> list[list[str]]:
    """Write the parameters of ``modules`` (arrays or TVM tensors) to ``path`` (a raw file, each distinct array
    once, 64-byte aligned) and its index beside it (``path`` + ``.json``); returns each module's parameters as keys
    of the index."""
    path = Path(path)
    index: dict[str, dict[str, Any]] = {}
    keys: list[list[str]] = []
    known: dict[int, str] = {}  # id(parameter) -> its key: a tensor shared by modules is read and hashed once
    offset = 0
    with path.open("wb") as out:
        for params in modules:
            keys.append([])
            for param in params:
                key = known.get(id(param))
                if key is None:
                    array = host_array(param)
                    key = known[id(param)] = _digest(array)
                    if key not in index:
                        pad = -offset % PARAM_ALIGNMENT
                        out.write(b"\0" * pad)
                        offset += pad
                        index[key] = {"offset": offset, "dtype": array.dtype.str, "shape": list(array.shape)}
                        out.write(np.ascontiguousarray(array).tobytes())
                        offset += array.nbytes
                keys[-1].append(key)
    Path(f"{path}.json").write_text(json.dumps(index))
    return keys


def read_params(path: str | Path) -> dict[str, Any]:
    """The arrays of a file written by :func:`write_params`, by key, as TVM tensors on the CPU: each read from the
    file straight into its tensor (one array at a time in transit: peak memory stays the weights' size)."""
    import tvm

    path = Path(path)
    index = json.loads(Path(f"{path}.json").read_text())
    tensors = {}
    with path.open("rb") as stored:
        for key, entry in index.items():
            dtype = np.dtype(entry["dtype"])
            count = int(np.prod(entry["shape"], dtype=np.int64))
            stored.seek(int(entry["offset"]))
            tensors[key] = tvm.runtime.tensor(np.fromfile(stored, dtype=dtype, count=count).reshape(entry["shape"]))
    return tensors


def share_params(modules: Sequence[Any], seen: dict[str, Any] | None = None) -> None:
    """Make equal parameters of ``modules`` (TVMModules built with lifted weights) one TVM tensor each, so that
    the modules run on one copy of the weights (a causal LM's prefill and decode builds pack the same weights);
    the arrays are then released. ``seen``: the tensors of earlier calls, by digest (a caller that shares each
    module as it is built holds one copy of the weights while it builds the next, not one per build)."""
    import tvm

    seen = {} if seen is None else seen
    for module in modules:
        shared = []
        for param in module.params:
            array = host_array(param)
            key = _digest(array)
            if key not in seen:
                seen[key] = tvm.runtime.tensor(np.ascontiguousarray(array))
            shared.append(seen[key])
        module.params = shared
        module._param_tensors = None
