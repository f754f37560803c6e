"""Issue 20: the build reads the integer graph's own arrays (no proto of the weights, no second copy): the
external initializers of a proto from serialize_sharing_weights are taken from the arrays handed to the build,
TVM adopts 64-byte-aligned ones (DLPack) and copies the rest, and the module computes exactly what a build from
the full proto computes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.backends.tvm import build
from qcompiler.backends.tvm.importer import _tvm_tensor
from qcompiler.ir.graph import ALIGNMENT, aligned_copy
from qcompiler.ir.ort_session import serialize_sharing_weights
from qcompiler.testing.kernel_models import single_node_model

pytestmark = pytest.mark.tvm


def test_aligned_arrays_are_adopted_and_the_others_copied() -> None:
    source = np.arange(4096, dtype=np.int8).reshape(64, 64)
    aligned = aligned_copy(source)
    assert aligned.ctypes.data % ALIGNMENT == 0 and np.array_equal(aligned, source)
    misaligned = np.empty(source.nbytes + 1, np.int8)[1:].reshape(64, 64)
    np.copyto(misaligned, source)
    adopted, copied = _tvm_tensor(aligned), _tvm_tensor(misaligned)
    aligned[0, 0] = misaligned[0, 0] = 99
    assert adopted.numpy()[0, 0] == 99  # the same memory
    assert copied.numpy()[0, 0] == source[0, 0]


def test_a_build_from_shared_weights_equals_a_build_from_the_proto() -> None:
    rng = np.random.default_rng(0)
    n, k = 256, 512  # the weight above SHARED_BYTES
    inits = {
        "w": aligned_copy(rng.integers(-128, 128, (n, k)).astype(np.int8)),
        "b": rng.integers(-5000, 5000, n).astype(np.int32),
        "m": rng.integers(1 << 30, 1 << 31, n).astype(np.int32),
        "s": rng.integers(36, 44, n).astype(np.int32),
    }
    proto = single_node_model("QGemm", ["w", "b", "m", "s"], (8, k), inits)
    model = ir.serde.deserialize_model(proto)
    model.graph.initializers["w"].const_value = ir.tensor(inits["w"], name="w")  # aligned: adopted
    shared_proto, weights = serialize_sharing_weights(model)
    assert [t.name for t in shared_proto.graph.initializer if t.external_data] == ["w"]
    assert not shared_proto.graph.initializer[0].raw_data  # the weight is not in the proto
    x = {"x": rng.integers(-128, 128, (8, k)).astype(np.int8)}
    want = build(proto, {"x": [8, k]}).run(x)[0]
    got = build(shared_proto, {"x": [8, k]}, weights=weights).run(x)[0]
    np.testing.assert_array_equal(got, want)
