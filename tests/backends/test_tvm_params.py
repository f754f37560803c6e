"""Weights lifted out of the code into one shared file, and a decode step's attention read from the cache in place."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.backends.tvm import build
from qcompiler.backends.tvm.params import PARAM_ALIGNMENT, read_params, share_params, write_params
from qcompiler.testing.assertions import llvm_functions

pytestmark = pytest.mark.tvm


def _gemm_model(weight: np.ndarray, bias: np.ndarray) -> object:
    """``x [4, K] int8 -> MatMulInteger(x, W) + b`` (int32): a large constant and a small one."""
    nodes = [
        helper.make_node("MatMulInteger", ["x", "w"], ["p"]),
        helper.make_node("Add", ["p", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [4, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_lifted_weights_run_as_embedded_ones_and_are_stored_once(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.integers(-128, 128, (64, 96)).astype(np.int8)  # 6 KB: lifted
    bias = rng.integers(-1000, 1000, (96,)).astype(np.int32)  # 384 B: stays in the code
    model = _gemm_model(weight, bias)
    x = rng.integers(-128, 128, (4, 64)).astype(np.int8)
    embedded = build(model, {"x": [4, 64]})
    lifted = build(model, {"x": [4, 64]}, lift_weights=True)
    assert embedded.params == []
    assert len(lifted.params) == 1 and lifted.params[0].nbytes >= weight.nbytes
    expected = x.astype(np.int32) @ weight.astype(np.int32) + bias
    np.testing.assert_array_equal(embedded.run({"x": x})[0], expected)
    np.testing.assert_array_equal(lifted.run({"x": x})[0], expected)

    again = build(model, {"x": [4, 64]}, lift_weights=True)
    packed = lifted.params[0].copy()
    share_params([lifted, again])
    assert lifted.params[0] is again.params[0]  # equal packed weights: one tensor
    np.testing.assert_array_equal(lifted.run({"x": x})[0], expected)

    path = tmp_path / "weights.bin"
    keys = write_params(path, [lifted.params, again.params])
    assert keys[0] == keys[1]
    assert path.stat().st_size == packed.nbytes  # once, not twice
    stored = read_params(path)
    np.testing.assert_array_equal(stored[keys[0][0]].numpy(), packed)
    library = tmp_path / "model.so"
    lifted.export(library)
    loaded = type(lifted).load(library, ["x"], ["int8"], params=[stored[k] for k in keys[0]])
    np.testing.assert_array_equal(loaded.run({"x": x})[0], expected)


def test_parameter_file_aligns_every_array(tmp_path):
    arrays = [np.arange(n, dtype=dtype) for n, dtype in ((3, np.int8), (5, np.int16), (7, np.int32), (3, np.int8))]
    keys = write_params(tmp_path / "w.bin", [arrays])
    assert keys[0][0] == keys[0][3] and len(set(keys[0])) == 3  # the repeated array stored once
    index = json.loads((tmp_path / "w.bin.json").read_text())
    assert all(entry["offset"] % PARAM_ALIGNMENT == 0 for entry in index.values())
    stored = read_params(tmp_path / "w.bin")
    for key, array in zip(keys[0], arrays, strict=True):
        np.testing.assert_array_equal(stored[key].numpy(), array)


def _decode_attention_model(heads: int, kv_heads: int, past: int, depth: int) -> object:
    """A decode step's two attention products over a grouped-query int16 cache, as a transformers export writes
    them: ``Concat(past, new) -> Unsqueeze -> Expand -> Reshape`` per cache, keys transposed, both widened."""
    group = heads // kv_heads
    total = past + 1
    nodes = []
    for name in ("k", "v"):
        nodes += [
            helper.make_node("Concat", [f"past_{name}", f"new_{name}"], [f"{name}_all"], axis=2),
            helper.make_node("Unsqueeze", [f"{name}_all", "axis2"], [f"{name}_5d"]),
            helper.make_node("Expand", [f"{name}_5d", "expand"], [f"{name}_wide"]),
            helper.make_node("Reshape", [f"{name}_wide", "heads"], [f"{name}_heads"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k_heads"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("Cast", ["k_t"], ["k_32"], to=TensorProto.INT32),
        helper.make_node("Cast", ["q"], ["q_32"], to=TensorProto.INT32),
        helper.make_node("MatMul", ["q_32", "k_32"], ["scores"]),
        helper.make_node("Cast", ["v_heads"], ["v_32"], to=TensorProto.INT32),
        helper.make_node("Cast", ["p"], ["p_32"], to=TensorProto.INT32),
        helper.make_node("MatMul", ["p_32", "v_32"], ["context"]),
    ]
    i16 = TensorProto.INT16
    inputs = [
        helper.make_tensor_value_info("q", i16, [1, heads, 1, depth]),
        helper.make_tensor_value_info("p", i16, [1, heads, 1, total]),
        helper.make_tensor_value_info("past_k", i16, [1, kv_heads, past, depth]),
        helper.make_tensor_value_info("new_k", i16, [1, kv_heads, 1, depth]),
        helper.make_tensor_value_info("past_v", i16, [1, kv_heads, past, depth]),
        helper.make_tensor_value_info("new_v", i16, [1, kv_heads, 1, depth]),
    ]
    outputs = [
        helper.make_tensor_value_info("scores", TensorProto.INT32, [1, heads, 1, total]),
        helper.make_tensor_value_info("context", TensorProto.INT32, [1, heads, 1, depth]),
    ]
    constants = [
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([1, kv_heads, group, total, depth], np.int64), "expand"),
        numpy_helper.from_array(np.array([1, heads, total, depth], np.int64), "heads"),
    ]
    graph = helper.make_graph(nodes, "decode_attention", inputs, outputs, constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("heads", "kv_heads", "past", "depth"), [(4, 2, 31, 16), (9, 3, 40, 8), (2, 2, 7, 24)])
def test_decode_attention_reads_the_cache_in_place_bit_exact(heads, kv_heads, past, depth):
    model = _decode_attention_model(heads, kv_heads, past, depth)
    bound = math.isqrt((2**31 - 1) // max(depth, past + 1))  # the lowering's bound on int16 attention operands
    rng = np.random.default_rng(heads * past)
    feeds = {
        "q": rng.integers(-bound, bound + 1, (1, heads, 1, depth)),
        "p": rng.integers(0, bound + 1, (1, heads, 1, past + 1)),
        **{f"{kind}_{name}": rng.integers(-bound, bound + 1, (1, kv_heads, length, depth))
           for kind, length in (("past", past), ("new", 1)) for name in ("k", "v")},
    }  # fmt: skip
    feeds = {k: v.astype(np.int16) for k, v in feeds.items()}
    feeds["q"][..., 0] = bound  # extremes where they meet
    feeds["past_k"][..., 0, 0] = -bound
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    compiled = build(model, shapes)
    scores, context = compiled.run(feeds)
    group = heads // kv_heads
    keys = np.repeat(np.concatenate([feeds["past_k"], feeds["new_k"]], axis=2), group, axis=1).astype(np.int64)
    values = np.repeat(np.concatenate([feeds["past_v"], feeds["new_v"]], axis=2), group, axis=1).astype(np.int64)
    np.testing.assert_array_equal(scores, feeds["q"].astype(np.int64) @ keys.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(context, feeds["p"].astype(np.int64) @ values)
    kernels = llvm_functions(compiled.llvm_ir())
    assert any(name.startswith("qbatch_matmul_rows") for name in kernels), "keys not read along their rows"
    copies = [n for n in kernels if any(op in n for op in ("transpose", "broadcast_to", "concatenate"))]
    assert not copies, f"the cache is copied per step by {copies}"
