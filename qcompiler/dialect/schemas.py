"""ONNX schemas of the ``qcompiler`` domain, registered with ``onnx.defs`` so the checker knows them.

The full specification (semantics, rounding, bit widths) is docs/dialect.md; the executable definition
is :mod:`qcompiler.dialect.reference`.
"""

from __future__ import annotations

import onnx.defs
import onnx.helper
from onnx.defs import OpSchema

DOMAIN = "qcompiler"
OPSET_VERSION = 1

_I8 = "tensor(int8)"
_I16 = "tensor(int16)"
_I32 = "tensor(int32)"
#: outputs with a clamp: int8, or int16 when [lo, hi] does not fit int8 (qcompiler.dialect.storage_dtype)
_OUT = ("Y", [_I8, _I16], "int8, or int16 when the clamp [lo, hi] needs it")
_WIDE_INPUT = ("X", [_I8, _I16], "int8, or int16 (W8A16: its level bound keeps the int32 sums exact)")
_INT = OpSchema.AttrType.INT
_INTS = OpSchema.AttrType.INTS


def _attr(name: str, default: int, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), doc)


_EPILOGUE_ATTRS = [
    _attr("zero_point", 0, "output zero point added after the rescale"),
    _attr("lo", -128, "lower clamp of the output (a fused ReLU raises it to zero_point); below -128: int16 output"),
    _attr("hi", 127, "upper clamp of the output; above 127: int16 output"),
]


def _param(name: str, type_str: str, doc: str, optional: bool = False) -> OpSchema.FormalParameter:
    if optional:
        return OpSchema.FormalParameter(name, type_str, doc, param_option=OpSchema.FormalParameterOption.Optional)
    return OpSchema.FormalParameter(name, type_str, doc)


_ROW_EXPONENT = _param(
    "row_exponent",
    _I8,
    "optional int8 [..., 1]: each row of the input stands at 2^e times its nominal scale (RowExponent); the "
    "shift of that row's rescale is shift - e",
    optional=True,
)


def _schemas() -> list[OpSchema]:
    requantize = OpSchema(
        "Requantize",
        DOMAIN,
        OPSET_VERSION,
        "y = clamp(((x * multiplier + 2^(shift-1)) >> shift) + zero_point, lo, hi), int64 arithmetic.",
        inputs=[
            _param("x", "T", "integer input (int32 accumulators, int8 or int16)"),
            _param("multiplier", _I32, "b in [2^30, 2^31), scalar or one per channel along axis"),
            _param("shift", _I32, "c in [1, 62], same shape as multiplier"),
            _ROW_EXPONENT,
        ],
        outputs=[_param("y", "Y", "int8 or int16 output")],
        type_constraints=[("T", [_I8, _I16, _I32], "integer input types"), _OUT],
        attributes=[_attr("axis", 1, "channel axis for per-channel multipliers"), *_EPILOGUE_ATTRS],
    )
    rescale_add = OpSchema(
        "RescaleAdd",
        DOMAIN,
        OPSET_VERSION,
        "y = clamp(((a*multiplier_a + b*multiplier_b + 2^(shift-1)) >> shift) + zero_point, lo, hi).",
        inputs=[
            _param("a", "A", "first addend"),
            _param("b", "B", "second addend (numpy broadcasting)"),
            _param("multiplier_a", _I32, "multiplier of a: scalar or one per channel of the last axis"),
            _param("multiplier_b", _I32, "multiplier of b: scalar or one per channel of the last axis"),
            _param("shift", _I32, "scalar shared shift"),
        ],
        outputs=[_param("y", "Y", "the sum at the output scale")],
        type_constraints=[("A", [_I8, _I16], "int8 or int16"), ("B", [_I8, _I16], "int8 or int16"), _OUT],
        attributes=list(_EPILOGUE_ATTRS),
    )
    qgemm = OpSchema(
        "QGemm",
        DOMAIN,
        OPSET_VERSION,
        "y = Requantize(x @ w^T + bias, axis=-1): int8 (or int16: W8A16) x int8 -> int32 accumulate, fused epilogue.",
        inputs=[
            _param("x", "X", "activations [..., K]"),
            _param("w", _I8, "weights [N, K] (nn.Linear layout)"),
            _param("bias", _I32, "int32 bias [N] at scale S_x * S_w"),
            _param("multiplier", _I32, "scalar or [N]"),
            _param("shift", _I32, "scalar or [N]"),
            _ROW_EXPONENT,
        ],
        outputs=[_param("y", "Y", "int8 (or int16) [..., N]")],
        type_constraints=[_WIDE_INPUT, _OUT],
        attributes=list(_EPILOGUE_ATTRS),
    )
    qgemm_int4 = OpSchema(
        "QGemmInt4",
        DOMAIN,
        OPSET_VERSION,
        "y = Requantize(sum_g group_scale[:, g] * (x_g @ w_g^T) + bias, axis=-1): int8 activations, int4 weights "
        "packed two per byte with one integer scale per group of input channels, exact int32 accumulation.",
        inputs=[
            _param("x", _I8, "activations [..., K]"),
            _param("w", "tensor(uint8)", "weights [N, ceil(K/2)]: code k of row n in byte k//2, low nibble first"),
            _param("group_scale", _I16, "[N, ceil(K/group_size)]: integer group rescales b in [1, 2^14]"),
            _param("bias", _I32, "int32 bias [N] at the accumulator scale"),
            _param("multiplier", _I32, "scalar or [N]"),
            _param("shift", _I32, "scalar or [N]"),
            _ROW_EXPONENT,
        ],
        outputs=[_param("y", "Y", "int8 (or int16) [..., N]")],
        type_constraints=[_OUT],
        attributes=[_attr("group_size", 128, "input channels per group"), *_EPILOGUE_ATTRS],
    )
    qconv = OpSchema(
        "QConv",
        DOMAIN,
        OPSET_VERSION,
        "y = Requantize(conv2d(x, w) + bias, axis=1): 2-D NCHW convolution with a fused epilogue.",
        inputs=[
            _param("x", "X", "activations [N, C, H, W]"),
            _param("w", _I8, "weights [M, C/group, kH, kW]"),
            _param("bias", _I32, "int32 bias [M] at scale S_x * S_w"),
            _param("multiplier", _I32, "scalar or [M]"),
            _param("shift", _I32, "scalar or [M]"),
        ],
        outputs=[_param("y", "Y", "int8 (or int16) [N, M, OH, OW]")],
        type_constraints=[_WIDE_INPUT, _OUT],
        attributes=[
            OpSchema.Attribute("strides", OpSchema.AttrType.INTS, "stride per spatial axis", required=False),
            OpSchema.Attribute("pads", OpSchema.AttrType.INTS, "begin/end pads (ONNX order)", required=False),
            OpSchema.Attribute("dilations", OpSchema.AttrType.INTS, "dilation per axis", required=False),
            _attr("group", 1, "number of groups"),
            *_EPILOGUE_ATTRS,
        ],
    )
    int_softmax = OpSchema(
        "IntSoftmax",
        DOMAIN,
        OPSET_VERSION,
        "Softmax over the last axis with I-BERT's integer exp; int8 probabilities at scale 2^-7.",
        inputs=[
            _param("x", "T", "integer scores (int8, int16 or int32) at scale S"),
            OpSchema.FormalParameter(
                "mask",
                "tensor(bool)",
                "optional: false entries are left out (adding -inf)",
                param_option=OpSchema.FormalParameterOption.Optional,
            ),
        ],
        outputs=[_param("y", "Y", "probabilities * 2^out_bits, in [0, 2^out_bits - 1]; 0 where masked")],
        type_constraints=[("T", [_I8, _I16, _I32], "integer input types"), _OUT],
        attributes=[
            _attr("ln2_q", 1, "floor(ln2 / S'), S' = S / 2^input_shift"),
            _attr("b_q", 0, "floor(1.353 / S')"),
            _attr("c_q", 0, "floor(0.344 / (0.3585 S'^2))"),
            _attr("input_shift", 0, "exact left shift of (x - max) to the fine scale S'"),
            _attr("out_bits", 7, "7: int8 probabilities at 2^-7; 15: int16 at 2^-15"),
        ],
    )
    int_layernorm = OpSchema(
        "IntLayerNorm",
        DOMAIN,
        OPSET_VERSION,
        "LayerNorm (or RMSNorm) over the last axis in integers with an exact integer square root, then a "
        "per-channel signed dyadic affine rescale.",
        inputs=[
            _param("x", "T", "int8 or int16 (wide residual stream) input"),
            _param("multiplier", _I32, "signed per-channel multiplier of gamma / S_y (2^-15 folded in)"),
            _param("shift", _I32, "per-channel shift"),
            _param("bias", _I32, "per-channel round(beta / S_y)"),
            OpSchema.FormalParameter(
                "input_multiplier",
                _I32,
                "optional, RMSNorm of a per-channel input: m_c = round(S_c / S 2^16), each channel to one scale S",
                param_option=OpSchema.FormalParameterOption.Optional,
            ),
        ],
        outputs=[_param("y", "Y", "int8 (or int16) output")],
        type_constraints=[("T", [_I8, _I16], "integer input types"), _OUT],
        attributes=[
            _attr("rms", 0, "1: RMSNorm (no mean subtraction)"),
            _attr("epsilon_q", 0, "epsilon in units of the radicand sum(d^2) 4^frac_bits / C"),
            _attr("frac_bits", 0, "fractional bits of the integer standard deviation, in [0, 8]"),
            *_EPILOGUE_ATTRS,
        ],
    )
    rescale_inputs = [
        _param("x", _I8, "int8 input"),
        _param("multiplier", _I32, "scalar b of the output rescale"),
        _param("shift", _I32, "scalar c of the output rescale"),
    ]
    int_gelu = OpSchema(
        "IntGelu",
        DOMAIN,
        OPSET_VERSION,
        "GELU with I-BERT's integer erf (serves the erf and the tanh forms); int8 in, int8 (or int16) out.",
        inputs=rescale_inputs,
        outputs=[_param("y", "Y", "int8 (or int16) output")],
        type_constraints=[_OUT],
        attributes=[
            _attr("input_shift", 0, "exact left shift to the fine scale"),
            _attr("b_q", 1, "floor(1.769 / s_erf)"),
            _attr("c_q", 1, "floor(1 / (0.2888 s_erf^2))"),
            _attr("pre_shift", 0, "rounding right shift before the output rescale"),
            *_EPILOGUE_ATTRS,
        ],
    )
    int_sigmoid = OpSchema(
        "IntSigmoid",
        DOMAIN,
        OPSET_VERSION,
        "Sigmoid (or SiLU = x sigmoid(x) with silu=1) from I-BERT's integer exp of -|x|; int8 or int16 in, int8 (or "
        "int16) out.",
        inputs=[_param("x", "T", "int8 or int16 input"), *rescale_inputs[1:]],
        outputs=[_param("y", "Y", "int8 (or int16) output")],
        type_constraints=[("T", [_I8, _I16], "integer input types"), _OUT],
        attributes=[
            _attr("input_shift", 0, "exact left shift to the fine scale"),
            _attr("ln2_q", 1, "floor(ln2 / s)"),
            _attr("b_q", 0, "floor(1.353 / s)"),
            _attr("c_q", 0, "floor(0.344 / (0.3585 s^2))"),
            _attr("one_q", 1, "floor(1 / (0.3585 s^2)): 1.0 at the exp output scale"),
            _attr("silu", 0, "1: x * sigmoid(x)"),
            _attr("pre_shift", 0, "rounding right shift before the output rescale"),
            *_EPILOGUE_ATTRS,
        ],
    )
    hadamard = OpSchema(
        "Hadamard",
        DOMAIN,
        OPSET_VERSION,
        "y = x @ (S_{2^m} (x) h) over the last axis, exact in int32: the block product h on each run of K "
        "channels, then m Sylvester butterfly stages (qcompiler.dialect.hadamard).",
        inputs=[
            _param("x", "T", "int8 or int16 activations [..., n], n = K 2^m, n < 2^16"),
            _param("h", _I8, "the K x K block (+-1 for a Hadamard matrix)"),
        ],
        outputs=[_param("y", _I32, "int32 [..., n]: |y| <= n max|x| max|h|")],
        type_constraints=[("T", [_I8, _I16], "integer input types")],
    )
    int_div = OpSchema(
        "IntDiv",
        DOMAIN,
        OPSET_VERSION,
        "y = clamp(round(a multiplier / (b 2^shift)) + zero_point, lo, hi): floor((2n + d) / (2d)) for n = a "
        "multiplier, d = b 2^shift (both negated when d < 0), int64; d = 0 saturates by the sign of a.",
        inputs=[
            _param("a", "A", "dividend"),
            _param("b", "B", "divisor (numpy broadcasting)"),
            _param("multiplier", _I32, "scalar b_m in [1, 2^31)"),
            _param("shift", _I32, "scalar c in [0, 46]"),
        ],
        outputs=[_param("y", "Y", "the quotient at the output scale")],
        type_constraints=[("A", [_I8, _I16], "int8 or int16"), ("B", [_I8, _I16], "int8 or int16"), _OUT],
        attributes=list(_EPILOGUE_ATTRS),
    )
    isqrt = OpSchema(
        "ISqrt",
        DOMAIN,
        OPSET_VERSION,
        "y = floor(sqrt(x)) for int64 0 <= x < 2^62, exact (Newton's iteration).",
        inputs=[_param("x", "tensor(int64)", "non-negative radicand")],
        outputs=[_param("y", "tensor(int64)", "its integer square root")],
    )
    row_exponent = OpSchema(
        "RowExponent",
        DOMAIN,
        OPSET_VERSION,
        "Per row of the last axis: e = the smallest e in [0, 9] with max|x| <= bound * 2^e (9 where none is), "
        "y = clamp(round_shift(x, e), -qmax, qmax) (x itself where e = 0): an int16 tensor as int8 codes with one "
        "power-of-two step per row (per token); qmax 127 (int8) or 7 (int4 levels).",
        inputs=[_param("x", _I16, "int16 [..., C]")],
        outputs=[_param("y", _I8, "int8 [..., C] in [-qmax, qmax]"), _param("e", _I8, "int8 [..., 1] in [0, 9]")],
        attributes=[
            _attr("qmax", 127, "the largest code: 127, or 7 for int4 levels"),
            _attr("bound", 0, "e is the smallest with max|x| <= bound * 2^e (0: qmax; above qmax: clipping)"),
        ],
    )
    return [
        requantize,
        row_exponent,
        rescale_add,
        qgemm,
        qgemm_int4,
        qconv,
        int_softmax,
        int_layernorm,
        int_gelu,
        int_sigmoid,
        int_div,
        isqrt,
        hadamard,
    ]


def register_schemas() -> None:
    """Register every schema once (idempotent: a second import does nothing)."""
    for schema in _schemas():
        if onnx.defs.has(schema.name, DOMAIN):
            continue
        onnx.defs.register_schema(schema)
