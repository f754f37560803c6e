"""Hypothesis strategies that generate valid float ONNX models: MLPs and CNNs with random shapes,
residual adds, BatchNorm, ReLU and pooling. Weights are real-valued and well scaled, so the models
are meaningful to quantize.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 21


@dataclasses.dataclass(frozen=True)
class GeneratedModel:
    """A generated float model, its input name and shape, and a seed for drawing inputs."""

    model: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]
    seed: int
    description: str
    fixed_inputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # e.g. an attention mask
    vocab: int | None = None  # token-id input (int64 in [0, vocab)) instead of a float one

    def inputs(self, count: int, offset: int = 0) -> list[dict[str, np.ndarray]]:
        """``count`` random input batches (standard normal, or token ids); ``offset`` picks a disjoint stream."""
        rng = np.random.default_rng(self.seed * 7919 + offset)
        if self.vocab is not None:
            return [
                {self.input_name: rng.integers(0, self.vocab, self.input_shape), **self.fixed_inputs}
                for _ in range(count)
            ]
        return [
            {self.input_name: rng.standard_normal(self.input_shape).astype(np.float32), **self.fixed_inputs}
            for _ in range(count)
        ]


class _Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.counter = 0
        self.parts: list[str] = []

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op.lower() + "_")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def weight(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

    def small(self, size: int) -> np.ndarray:
        """A bias-like vector: N(0, 0.1^2), float32."""
        return (self.rng.standard_normal(size) * 0.1).astype(np.float32)

    def batchnorm(self, x: str, channels: int) -> str:
        gamma = self.rng.uniform(0.5, 1.5, channels).astype(np.float32)
        beta = self.rng.uniform(-0.5, 0.5, channels).astype(np.float32)
        mean = self.rng.uniform(-0.5, 0.5, channels).astype(np.float32)
        var = self.rng.uniform(0.5, 2.0, channels).astype(np.float32)
        inputs = [x] + [self.const("bn", a) for a in (gamma, beta, mean, var)]
        self.parts.append("bn")
        return self.node("BatchNormalization", inputs, epsilon=1e-5)

    def model(
        self, x: str, shape: tuple[int, ...], out: str, out_shape: tuple[int, ...],
        extra_inputs: list[onnx.ValueInfoProto] | None = None, input_type: int = TensorProto.FLOAT,
        opset: int = OPSET,
    ) -> onnx.ModelProto:  # fmt: skip
        graph = helper.make_graph(
            self.nodes,
            "generated",
            [helper.make_tensor_value_info(x, input_type, list(shape)), *(extra_inputs or [])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model)
        return model


@st.composite
def mlp_models(draw: st.DrawFn, max_layers: int = 4, max_width: int = 48) -> GeneratedModel:
    """MLPs: Gemm (either weight layout) or MatMul + bias Add, optional BatchNorm, ReLU and residual adds."""
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(np.random.default_rng(seed))
    batch = draw(st.sampled_from([1, 2, 3, 8]))
    width = draw(st.integers(1, max_width))
    x = "input"
    current, current_width = x, width
    for _ in range(draw(st.integers(1, max_layers))):
        out_width = draw(st.one_of(st.just(current_width), st.integers(1, max_width)))
        layer_input = current
        kind = draw(st.sampled_from(["gemm", "gemm_t", "matmul_add"]))
        weight = b.weight((current_width, out_width), current_width)
        bias = b.small(out_width)
        if kind == "gemm":
            y = b.node("Gemm", [current, b.const("w", weight), b.const("b", bias)])
        elif kind == "gemm_t":
            y = b.node("Gemm", [current, b.const("w", np.ascontiguousarray(weight.T)), b.const("b", bias)], transB=1)
        else:
            y = b.node("Add", [b.node("MatMul", [current, b.const("w", weight)]), b.const("b", bias)])
        b.parts.append(kind)
        if draw(st.booleans()):
            y = b.batchnorm(y, out_width)
        relu = draw(st.booleans())
        if out_width == current_width and draw(st.booleans()):
            if relu:
                y = b.node("Relu", [y])
            y = b.node("Add", [y, layer_input])
            b.parts.append("residual")
            if draw(st.booleans()):
                y = b.node("Relu", [y])
        elif relu:
            y = b.node("Relu", [y])
        current, current_width = y, out_width
    model = b.model(x, (batch, width), current, (batch, current_width))
    return GeneratedModel(model, x, (batch, width), seed, "mlp:" + ",".join(b.parts))


@st.composite
def cnn_models(draw: st.DrawFn, max_blocks: int = 3) -> GeneratedModel:
    """CNNs: Conv (1x1/3x3, stride 1/2, with or without bias), BatchNorm, ReLU, MaxPool, residual adds,
    then GlobalAveragePool or Flatten, and a Gemm head."""
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(np.random.default_rng(seed))
    batch = draw(st.sampled_from([1, 2]))
    channels = draw(st.integers(1, 8))
    height, width = draw(st.integers(4, 12)), draw(st.integers(4, 12))
    x = "input"
    current = x
    c, h, w = channels, height, width
    for _ in range(draw(st.integers(1, max_blocks))):
        out_c = draw(st.one_of(st.just(c), st.integers(1, 16)))
        kernel = draw(st.sampled_from([1, 3]))
        stride = draw(st.sampled_from([1, 1, 2])) if min(h, w) >= 4 else 1
        pad = kernel // 2
        inputs = [current, b.const("w", b.weight((out_c, c, kernel, kernel), c * kernel * kernel))]
        if draw(st.booleans()):
            inputs.append(b.const("b", b.small(out_c)))
        y = b.node("Conv", inputs, kernel_shape=[kernel, kernel], pads=[pad] * 4, strides=[stride, stride])
        b.parts.append(f"conv{kernel}s{stride}")
        out_h, out_w = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
        if draw(st.booleans()):
            y = b.batchnorm(y, out_c)
        relu = draw(st.booleans())
        if (out_c, out_h, out_w) == (c, h, w) and draw(st.booleans()):
            if relu:
                y = b.node("Relu", [y])
            y = b.node("Add", [y, current])
            b.parts.append("residual")
            if draw(st.booleans()):
                y = b.node("Relu", [y])
        elif relu:
            y = b.node("Relu", [y])
        if min(out_h, out_w) >= 4 and draw(st.booleans()):
            y = b.node("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
            out_h, out_w = out_h // 2, out_w // 2
            b.parts.append("maxpool")
        current, c, h, w = y, out_c, out_h, out_w
    if draw(st.booleans()):
        current = b.node("GlobalAveragePool", [current])
        features = c
        b.parts.append("gap")
    else:
        features = c * h * w
    current = b.node("Flatten", [current], axis=1)
    classes = draw(st.integers(1, 12))
    current = b.node(
        "Gemm",
        [
            current,
            b.const("w", b.weight((features, classes), features)),
            b.const("b", b.small(classes)),
        ],
    )
    model = b.model(x, (batch, channels, height, width), current, (batch, classes))
    return GeneratedModel(model, x, (batch, channels, height, width), seed, "cnn:" + ",".join(b.parts))


def models() -> st.SearchStrategy[GeneratedModel]:
    """MLPs and CNNs."""
    return st.one_of(mlp_models(), cnn_models())


@st.composite
def token_mlp_models(draw: st.DrawFn, max_width: int = 64) -> GeneratedModel:
    """Transformer-style blocks on [tokens, features] (or [batch, tokens, features] with MatMul + Add linears, as
    exporters write them): LayerNorm, linear, GELU (erf or tanh) or Sigmoid, linear, residual Add, optional second
    LayerNorm, then a linear head and a Softmax over the last axis."""
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(np.random.default_rng(seed))
    batch = draw(st.sampled_from([None, 1, 2]))
    tokens = draw(st.integers(1, 16))
    width = draw(st.integers(2, max_width))
    hidden = draw(st.integers(2, 2 * max_width))
    x = "input"

    def layernorm(value: str) -> str:
        gamma = b.rng.uniform(0.5, 1.5, width).astype(np.float32)
        beta = b.small(width)
        b.parts.append("layernorm")
        return b.node("LayerNormalization", [value, b.const("g", gamma), b.const("beta", beta)], axis=-1)

    def gemm(value: str, fan_in: int, fan_out: int) -> str:
        weight = b.weight((fan_in, fan_out), fan_in)
        bias = b.small(fan_out)
        if batch is not None:
            return b.node("Add", [b.node("MatMul", [value, b.const("w", weight)]), b.const("b", bias)])
        return b.node("Gemm", [value, b.const("w", weight), b.const("b", bias)])

    normed = layernorm(x)
    up = gemm(normed, width, hidden)
    activation = draw(st.sampled_from(["gelu", "gelu_tanh", "sigmoid"]))
    if activation == "sigmoid":
        act = b.node("Sigmoid", [up])
    else:
        act = b.node("Gelu", [up], approximate="tanh" if activation == "gelu_tanh" else "none")
    b.parts.append(activation)
    down = gemm(act, hidden, width)
    current = b.node("Add", [down, x])
    b.parts.append("residual")
    if draw(st.booleans()):
        current = layernorm(current)
    classes = draw(st.integers(2, 16))
    logits = gemm(current, width, classes)
    out = b.node("Softmax", [logits], axis=-1)
    b.parts.append("softmax")
    lead = (tokens,) if batch is None else (batch, tokens)
    if batch is not None:
        b.parts.append(f"batch={batch}")
    model = b.model(x, (*lead, width), out, (*lead, classes))
    return GeneratedModel(model, x, (*lead, width), seed, "token-mlp:" + ",".join(b.parts))


@st.composite
def attention_models(draw: st.DrawFn) -> GeneratedModel:
    """Pre-norm self-attention on [tokens, features]: LayerNorm, Q/K/V projections, heads by Reshape/Transpose,
    Q K^T scaled by 1/sqrt(d) (Mul or Div), Softmax, P V, head merge, output projection, residual Add."""
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(np.random.default_rng(seed))
    tokens = draw(st.integers(1, 12))
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    width = heads * head_dim
    x = "input"
    gamma = b.rng.uniform(0.5, 1.5, width).astype(np.float32)
    beta = b.small(width)
    normed = b.node("LayerNormalization", [x, b.const("g", gamma), b.const("beta", beta)], axis=-1)

    def projection(value: str) -> str:
        weight = b.weight((width, width), width)
        bias = b.small(width)
        return b.node("Gemm", [value, b.const("w", weight), b.const("b", bias)])

    split_shape = b.const("shape", np.array([tokens, heads, head_dim], np.int64))
    q = b.node("Transpose", [b.node("Reshape", [projection(normed), split_shape])], perm=[1, 0, 2])
    k = b.node("Transpose", [b.node("Reshape", [projection(normed), split_shape])], perm=[1, 2, 0])
    v = b.node("Transpose", [b.node("Reshape", [projection(normed), split_shape])], perm=[1, 0, 2])
    scores = b.node("MatMul", [q, k])
    if draw(st.booleans()):
        scaled = b.node("Mul", [scores, b.const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))])
        b.parts.append("mul-scale")
    else:
        scaled = b.node("Div", [scores, b.const("scale", np.array(np.sqrt(head_dim), np.float32))])
        b.parts.append("div-scale")
    masked = draw(st.booleans())
    fixed: dict[str, np.ndarray] = {}
    extra = []
    if masked:  # torch SDPA's export: Where(keep, 0, -inf) added to the scores, and a NaN guard after Softmax
        keep = b.rng.random((1, 1, tokens)) > 0.3
        if draw(st.booleans()):
            keep[:] = False  # every key masked: the guard turns the NaN rows into zeros
        fixed["keep"] = keep
        extra.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, tokens]))
        additive = b.node(
            "Where",
            ["keep", b.const("zero", np.array(0.0, np.float32)), b.const("ninf", np.array(-np.inf, np.float32))],
        )
        probs = b.node("Softmax", [b.node("Add", [scaled, additive])], axis=-1)
        probs = b.node("Where", [b.node("IsNaN", [probs]), b.const("zero", np.array(0.0, np.float32)), probs])
        b.parts.append("masked")
    else:
        probs = b.node("Softmax", [scaled], axis=-1)
    context = b.node("MatMul", [probs, v])
    merged = b.node(
        "Reshape",
        [b.node("Transpose", [context], perm=[1, 0, 2]), b.const("shape", np.array([tokens, width], np.int64))],
    )
    out = b.node("Add", [projection(merged), x])
    b.parts.append(f"heads={heads}x{head_dim}")
    model = b.model(x, (tokens, width), out, (tokens, width), extra)
    return GeneratedModel(model, x, (tokens, width), seed, "attention:" + ",".join(b.parts), fixed)


@st.composite
def transformer_models(draw: st.DrawFn, max_layers: int = 2) -> GeneratedModel:
    """Small language models on [tokens] ids: an embedding lookup, 1-2 transformer blocks and a head.

    Draws pre-norm or post-norm blocks, RMSNorm or LayerNorm (with random gains and shifts), multi-head or
    grouped-query attention (KV heads shared by Unsqueeze/Expand/Reshape, as torch exports them), rotary embeddings
    (rotate-half with constant cos/sin tables) or none, a causal mask, SwiGLU or GELU MLPs, linears with biases
    (``Gemm``) or without (``MatMul``), and a final norm before the head in pre-norm models. Everything the
    float-exact transforms must handle, in the shapes exporters write.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(np.random.default_rng(seed))
    vocab = draw(st.integers(4, 24))
    tokens = draw(st.integers(2, 8))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 6, 8]))
    hidden = heads * head_dim
    inner = draw(st.integers(2, 24))
    layers = draw(st.integers(1, max_layers))
    norm_kind = draw(st.sampled_from(["rms", "layer"]))
    pre_norm = draw(st.booleans())
    biases = draw(st.booleans())
    rope = draw(st.booleans())
    mlp = draw(st.sampled_from(["swiglu", "gelu"]))
    b.parts += [norm_kind, "pre-norm" if pre_norm else "post-norm", f"heads={heads}/{kv_heads}x{head_dim}",
                mlp, "bias" if biases else "no-bias", *(["rope"] if rope else []), f"layers={layers}"]  # fmt: skip

    def norm(value: str) -> str:
        gain = b.const("g", b.rng.uniform(0.5, 1.5, hidden).astype(np.float32))
        if norm_kind == "rms":
            return b.node("RMSNormalization", [value, gain], axis=-1, epsilon=1e-5)
        return b.node("LayerNormalization", [value, gain, b.const("beta", b.small(hidden))], axis=-1)

    def linear(value: str, fan_in: int, fan_out: int) -> str:
        weight = b.const("w", b.weight((fan_in, fan_out), fan_in))
        if biases:
            return b.node("Gemm", [value, weight, b.const("b", b.small(fan_out))])
        return b.node("MatMul", [value, weight])

    def shape(*dims: int) -> str:
        return b.const("shape", np.array(dims, np.int64))

    def split_heads(value: str, count: int) -> str:  # [T, count*d] -> [count, T, d]
        return b.node("Transpose", [b.node("Reshape", [value, shape(tokens, count, head_dim)])], perm=[1, 0, 2])

    def share(value: str) -> str:  # [kv, T, d] -> [heads, T, d]
        if heads == kv_heads:
            return value
        group = heads // kv_heads
        expanded = b.node("Expand", [b.node("Unsqueeze", [value, shape(1)]), shape(kv_heads, group, tokens, head_dim)])
        return b.node("Reshape", [expanded, shape(heads, tokens, head_dim)])

    position = np.arange(tokens)[:, None] * (10000.0 ** (-np.arange(head_dim // 2) / max(head_dim // 2, 1)))[None]
    angles = np.concatenate([position, position], axis=1)
    cos, sin = b.const("cos", np.cos(angles).astype(np.float32)), b.const("sin", np.sin(angles).astype(np.float32))
    half = head_dim // 2

    def rotary(value: str) -> str:
        first = b.node("Slice", [value, shape(0), shape(half), shape(-1)])
        second = b.node("Slice", [value, shape(half), shape(head_dim), shape(-1)])
        rotated = b.node("Concat", [b.node("Neg", [second]), first], axis=-1)
        return b.node("Add", [b.node("Mul", [value, cos]), b.node("Mul", [rotated, sin])])

    mask = b.const("mask", np.triu(np.full((tokens, tokens), -1e4, np.float32), 1))
    scale = b.const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))

    def attention(value: str) -> str:
        q = split_heads(linear(value, hidden, hidden), heads)
        k = split_heads(linear(value, hidden, kv_heads * head_dim), kv_heads)
        v = split_heads(linear(value, hidden, kv_heads * head_dim), kv_heads)
        if rope:
            q, k = rotary(q), rotary(k)
        k = b.node("Transpose", [share(k)], perm=[0, 2, 1])
        scores = b.node("Add", [b.node("Mul", [b.node("MatMul", [q, k]), scale]), mask])
        context = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), share(v)])
        merged = b.node("Reshape", [b.node("Transpose", [context], perm=[1, 0, 2]), shape(tokens, hidden)])
        return linear(merged, hidden, hidden)

    def feed_forward(value: str) -> str:
        if mlp == "swiglu":
            gate = linear(value, hidden, inner)
            act = b.node("Mul", [b.node("Mul", [gate, b.node("Sigmoid", [gate])]), linear(value, hidden, inner)])
        else:
            act = b.node("Gelu", [linear(value, hidden, inner)])
        return linear(act, inner, hidden)

    table = b.const("embedding", b.rng.standard_normal((vocab, hidden)).astype(np.float32))
    x = b.node("Gather", [table, "ids"], axis=0)
    for _ in range(layers):
        if pre_norm:
            x = b.node("Add", [x, attention(norm(x))])
            x = b.node("Add", [x, feed_forward(norm(x))])
        else:
            x = norm(b.node("Add", [x, attention(x)]))
            x = norm(b.node("Add", [x, feed_forward(x)]))
    if pre_norm:
        x = norm(x)
    logits = linear(x, hidden, vocab)
    model = b.model("ids", (tokens,), logits, (tokens, vocab), input_type=TensorProto.INT64, opset=23)
    return GeneratedModel(model, "ids", (tokens,), seed, "transformer:" + ",".join(b.parts), vocab=vocab)


@st.composite
def shared_parameter_models(draw: st.DrawFn, max_layers: int = 4) -> GeneratedModel:
    """Linears with biases whose constants are shared, as exporters store equal constants once: every zero bias
    of a freshly initialised model is one initializer, fresh BatchNorms share (1, 0, 0, 1) and fresh RMSNorms one
    gain of ones, and tied layers share a weight.

    Draws an MLP on [batch, width] (MatMul + Add, Gemm + Add, Gemm with a bias input), a token MLP on
    [batch, tokens, width] (MatMul + Add) or a CNN (Conv + per-channel Add, Conv with a bias input, Conv +
    BatchNorm), with decomposed RMSNorms as torch writes them (MLPs), ReLUs and residual Adds. Every layer keeps
    the width, so any layer may reuse an earlier weight; each constant is new, the shared zero (or fresh-norm)
    one of its shape, or an earlier one of its shape.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(np.random.default_rng(seed))
    kind = draw(st.sampled_from(["mlp", "tokens", "cnn"]))
    width = draw(st.integers(1, 8))
    shape = {
        "mlp": (draw(st.integers(1, 3)), width),
        "tokens": (draw(st.integers(1, 2)), draw(st.integers(1, 4)), width),
        "cnn": (draw(st.integers(1, 2)), width, draw(st.integers(1, 5)), draw(st.integers(1, 5))),
    }[kind]
    pools: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    fresh: dict[tuple[str, tuple[int, ...]], str] = {}

    def constant(role: str, array: np.ndarray, fresh_value: float | None = None) -> str:
        """A new constant, the shared fresh one (all ``fresh_value``) or an earlier one of the same role and shape."""
        key = (role, array.shape)
        options = ["new"] + (["fresh"] if fresh_value is not None else []) + (["reuse"] if pools.get(key) else [])
        choice = draw(st.sampled_from(options))
        if choice == "reuse":
            b.parts.append(f"reused-{role}")
            return draw(st.sampled_from(pools[key]))
        if choice == "fresh":
            if key not in fresh:
                fresh[key] = b.const(role, np.full(array.shape, fresh_value, np.float32))
                b.parts.append(f"shared-{role}")
            return fresh[key]
        name = b.const(role, array)
        pools.setdefault(key, []).append(name)
        return name

    def bias(shape: tuple[int, ...]) -> str:
        return constant("b", b.small(int(np.prod(shape))).reshape(shape), fresh_value=0.0)

    def rms_norm(x: str) -> str:  # x * Reciprocal(Sqrt(ReduceMean(x^2, -1) + eps)) * gain
        square = b.node("Pow", [x, constant("two", np.array(2.0, np.float32))])
        mean = b.node("ReduceMean", [square, constant("axes", np.array([-1], np.int64))], keepdims=1)
        eps = constant("eps", np.array(1e-5, np.float32))
        normalized = b.node("Mul", [x, b.node("Reciprocal", [b.node("Sqrt", [b.node("Add", [mean, eps])])])])
        gain = constant("gain", b.rng.uniform(0.5, 1.5, width).astype(np.float32), fresh_value=1.0)
        b.parts.append("rms")
        return b.node("Mul", [normalized, gain])

    def layer(x: str) -> str:
        if kind == "cnn":
            op = draw(st.sampled_from(["conv_add", "conv_bias", "conv_bn"]))
            k = draw(st.sampled_from([1, 3]))
            weight = constant("w", b.weight((width, width, k, k), width * k * k))
            with_bias = op == "conv_bias" or (op == "conv_bn" and draw(st.booleans()))
            inputs = [x, weight, bias((width,))] if with_bias else [x, weight]
            y = b.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4)
            if op == "conv_add":
                y = b.node("Add", [y, bias(draw(st.sampled_from([(width, 1, 1), (1, width, 1, 1)])))])
            if op == "conv_bn":
                params = [
                    constant("bn_scale", b.rng.uniform(0.5, 1.5, width).astype(np.float32), fresh_value=1.0),
                    constant("bn_shift", b.small(width), fresh_value=0.0),
                    constant("bn_mean", b.small(width), fresh_value=0.0),
                    constant("bn_var", b.rng.uniform(0.5, 2.0, width).astype(np.float32), fresh_value=1.0),
                ]
                y = b.node("BatchNormalization", [y, *params], epsilon=1e-5)
            b.parts.append(op)
            return y
        if kind == "mlp" and draw(st.booleans()):
            x = rms_norm(x)
        op = draw(st.sampled_from(["matmul_add", "gemm_add", "gemm_bias"] if kind == "mlp" else ["matmul_add"]))
        weight = constant("w", b.weight((width, width), width))
        b.parts.append(op)
        if op == "gemm_bias":
            return b.node("Gemm", [x, weight, bias((width,))], transB=draw(st.sampled_from([0, 1])))
        product = b.node("MatMul", [x, weight]) if op == "matmul_add" else b.node("Gemm", [x, weight])
        lead = len(shape) - 1
        return b.node("Add", [product, bias(draw(st.sampled_from([(width,), (1,) * lead + (width,)])))])

    x = "input"
    current = x
    for _ in range(draw(st.integers(1, max_layers))):
        y = layer(current)
        if draw(st.booleans()):
            y = b.node("Relu", [y])
        if draw(st.booleans()):
            y = b.node("Add", [y, current])
            b.parts.append("residual")
        current = y
    model = b.model(x, shape, current, shape)
    return GeneratedModel(model, x, shape, seed, f"shared-{kind}:" + ",".join(b.parts))


@st.composite
def modern_cnn_models(draw: st.DrawFn, max_blocks: int = 3) -> GeneratedModel:
    """CNN blocks of the families the zoo covers: depthwise and grouped convolutions, squeeze-excitation
    (pooled vector, 1x1 convs, Sigmoid gate, broadcast Mul), elementwise activations lowered as tables
    (HardSwish, LeakyRelu, Tanh, HardSigmoid, SiLU), two-branch Concat of differently scaled inputs, Split of
    channels, ReduceMean over the spatial axes; a Gemm head."""
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(np.random.default_rng(seed))
    batch = draw(st.sampled_from([1, 2]))
    c = draw(st.sampled_from([2, 4, 6, 8]))
    h, w = draw(st.integers(4, 9)), draw(st.integers(4, 9))
    x = "input"
    current = x
    channels = c

    def activation(value: str) -> str:
        kind = draw(st.sampled_from(["HardSwish", "LeakyRelu", "Tanh", "HardSigmoid", "SiLU", "Relu"]))
        b.parts.append(kind.lower())
        if kind == "SiLU":
            return b.node("Mul", [value, b.node("Sigmoid", [value])])
        return b.node(kind, [value])

    for _ in range(draw(st.integers(1, max_blocks))):
        block = draw(st.sampled_from(["depthwise", "grouped", "se", "concat", "split"]))
        b.parts.append(block)
        if block == "depthwise":
            weight = b.const("w", b.weight((c, 1, 3, 3), 9))
            current = activation(b.node("Conv", [current, weight, b.const("b", b.small(c))], group=c, pads=[1] * 4))
        elif block == "grouped":
            groups = 2
            out_c = draw(st.sampled_from([2, 4, 6]))
            weight = b.const("w", b.weight((out_c, c // groups, 1, 1), c // groups))
            current, c = activation(b.node("Conv", [current, weight], group=groups)), out_c
        elif block == "se":
            squeezed = max(1, c // 2)
            pooled = b.node("ReduceMean", [current, b.const("axes", np.array([2, 3], np.int64))], keepdims=1)
            hidden = b.node("Relu", [b.node("Conv", [pooled, b.const("w", b.weight((squeezed, c, 1, 1), c))])])
            gate = b.node("Sigmoid", [b.node("Conv", [hidden, b.const("w", b.weight((c, squeezed, 1, 1), squeezed))])])
            current = b.node("Mul", [current, gate])
        elif block == "concat":  # two branches at ranges several times apart
            left = b.node("Conv", [current, b.const("w", b.weight((c, c, 1, 1), c))])
            right = b.node("Conv", [current, b.const("w", b.weight((c, c, 1, 1), c) * 4.0)])
            current, c = b.node("Concat", [left, right], axis=1), 2 * c
        else:  # split the channels in two halves, activate one, join them again
            first, second = (b.name("split") for _ in range(2))
            b.nodes.append(helper.make_node("Split", [current], [first, second], axis=1, num_outputs=2))
            current = b.node("Concat", [activation(first), second], axis=1)
        if c > 8:  # keep the width small
            current, c = b.node("Conv", [current, b.const("w", b.weight((4, c, 1, 1), c))]), 4
    pooled = b.node("ReduceMean", [current, b.const("axes", np.array([2, 3], np.int64))], keepdims=0)
    classes = draw(st.integers(1, 6))
    logits = b.node("Gemm", [pooled, b.const("w", b.weight((c, classes), c)), b.const("b", b.small(classes))])
    model = b.model(x, (batch, channels, h, w), logits, (batch, classes))
    return GeneratedModel(model, x, (batch, channels, h, w), seed, "modern-cnn:" + ",".join(b.parts))
