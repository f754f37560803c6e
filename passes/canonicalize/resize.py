"""A Resize on an NCHW tensor with constant scales or sizes becomes ops the integer path has: products by constant
interpolation matrices (mode ``linear``) or a Gather per axis (mode ``nearest``).

``Resize(x)[n, c, i, j] = sum_{h, w} A_h[h, i] A_w[w, j] x[n, c, h, w]``: ONNX resizes one axis at a time, so
``Resize(x) = Transpose(MatMul(Transpose(MatMul(x, A_w)), A_h))``, and in nearest mode each column of ``A`` holds
one 1, whose row is the index a Gather reads. Each ``A`` is ONNX's own by construction: onnx.reference resizes the
axis's basis vectors (``A[k, :] = Resize(e_k)``), so every coordinate transformation, rounding rule and antialias
filter it implements carries over exactly. Axes the Resize leaves as they are get no op.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.reference
import onnx_ir as ir

from qcompiler.ir.graph import add_initializer, const_array

logger = logging.getLogger(__name__)

SUPPORTED_MODES = ("linear", "nearest")
_SPATIAL_AXES = (2, 3)
_SWAP_LAST_TWO = [0, 1, 3, 2]
_WHAT_IS_REWRITTEN = (
    "decompose-resize rewrites mode linear or nearest with constant scales or sizes on a static 4-D NCHW tensor, "
    "resizing H and W only"
)


@dataclasses.dataclass(frozen=True)
class ResizePlan:
    """How one Resize decomposes: ``matrices[axis]`` is ``A`` of that spatial axis, ``[in, out]``, for the axes it
    changes (none: the Resize is an identity)."""

    mode: str
    matrices: dict[int, np.ndarray]


def plan_resize(node: ir.Node) -> ResizePlan | str:
    """The decomposition of ``node``, or the reason it has none (a failed check explains itself, never raises)."""
    if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
        return "not a Resize"
    mode = node.attributes.get_string("mode", "nearest")
    if mode not in SUPPORTED_MODES:
        return f"mode {mode!r} has no integer form (supported: {', '.join(SUPPORTED_MODES)})"
    if node.attributes.get_string("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        return "coordinate_transformation_mode 'tf_crop_and_resize' (a region of interest) is not rewritten"
    x = node.inputs[0]
    if x is None or x.shape is None or len(x.shape) != 4 or not x.shape.is_static():
        return "its input is not a 4-D tensor of static shape (run infer-shapes with fixed input shapes)"
    if mode == "linear" and x.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16):
        return f"linear interpolation of a {x.dtype} tensor"
    full = _full_rank_parameters(node, [int(d) for d in x.shape])
    if isinstance(full, str):
        return full
    scales, sizes = full
    if sizes is not None and node.attributes.get_string("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "keep_aspect_ratio_policy other than 'stretch' couples the axes' scales"
    if (scales is not None and any(s != 1.0 for s in scales[:2])) or (
        sizes is not None and any(sizes[a] != x.shape[a] for a in (0, 1))
    ):
        return "it resizes the batch or channel axis"
    if scales is not None:
        for axis in _SPATIAL_AXES:
            length = float(scales[axis]) * int(x.shape[axis])
            if math.floor(length) != round(length) or not math.isclose(length, round(length), rel_tol=1e-6):
                # onnx.reference floors the length and keeps the given scale; onnxruntime does neither
                return (
                    f"scale {float(scales[axis]):.6g} takes axis {axis} from {x.shape[axis]} to {length:.9g}, not a "
                    "whole length: ONNX runtimes disagree on such a resize (give sizes instead)"
                )
    matrices: dict[int, np.ndarray] = {}
    for axis in _SPATIAL_AXES:
        try:
            matrix, onnxruntime_matrix = _interpolation_matrices(node, int(x.shape[axis]), axis, scales, sizes)
        except Exception as error:  # an attribute combination a runtime rejects (antialias with nearest)
            return f"onnx.reference or onnxruntime cannot run it: {error}"
        if matrix.shape != onnxruntime_matrix.shape or not np.allclose(matrix, onnxruntime_matrix, rtol=0, atol=1e-6):
            # a source coordinate on a rounding boundary (nearest ties) or an edge case the two read differently
            return (
                f"onnx.reference and onnxruntime disagree on this resize of axis {axis} (a source coordinate on a "
                "rounding boundary?): its meaning is not settled"
            )
        if mode == "nearest" and not _one_source_per_column(matrix):
            return f"nearest resize of axis {axis} does not read one source element per output element"
        if matrix.shape[0] != matrix.shape[1] or not np.array_equal(matrix, np.eye(matrix.shape[0])):
            matrices[axis] = matrix
    return ResizePlan(mode, matrices)


def resize_refusal(node: ir.Node) -> str:
    """What a user reads when a Resize reaches the quantizer: why it was not decomposed and what to do."""
    plan = plan_resize(node)
    why = "the canonicalize list has no decompose-resize" if isinstance(plan, ResizePlan) else plan
    return (
        f"{why}; {_WHAT_IS_REWRITTEN}. Export it in such a form, or compile with integer_only=False "
        "(CLI --float-islands) to keep it in float"
    )


def _full_rank_parameters(node: ir.Node, shape: list[int]) -> tuple[np.ndarray | None, np.ndarray | None] | str:
    """Scales or sizes for all four axes (the ``axes`` attribute undone), exactly one of them given."""
    inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
    scales, sizes = (const_array(v) for v in inputs[2:4])
    if any(v is not None and const_array(v) is None for v in inputs[2:4]):
        return "its scales or sizes are computed at run time (fold constants first)"
    scales = None if scales is None or scales.size == 0 else scales.astype(np.float32)
    sizes = None if sizes is None or sizes.size == 0 else sizes.astype(np.int64)
    if (scales is None) == (sizes is None):
        return "it needs exactly one of scales and sizes"
    axes = node.attributes.get_ints("axes", None)
    if axes is None:
        return scales, sizes
    positions = [int(a) % 4 for a in axes]
    if scales is not None:
        full_scales = np.ones(4, np.float32)
        full_scales[positions] = scales
        return full_scales, None
    assert sizes is not None
    full_sizes = np.array(shape, np.int64)
    full_sizes[positions] = sizes
    return None, full_sizes


def _interpolation_matrices(
    node: ir.Node, length: int, axis: int, scales: np.ndarray | None, sizes: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``A[k, :] = Resize(e_k)`` along ``axis`` by onnx.reference (float64) and by onnxruntime (float32), the basis
    vectors stacked on the batch axis and every other axis of length 1 and left as it is."""
    import onnxruntime  # only when a Resize is decomposed: not on qcompiler's import path

    probe_shape = [length, 1, 1, 1]
    probe_shape[axis] = length
    attributes = {name: attr.value for name, attr in node.attributes.items() if name != "axes"}
    inputs = ["x", ""]
    parameters: dict[str, np.ndarray] = {}
    if scales is not None:
        parameters["scales"] = np.ones(4, np.float32)
        parameters["scales"][axis] = scales[axis]
        inputs.append("scales")
    else:
        assert sizes is not None
        parameters["sizes"] = np.array(probe_shape, np.int64)
        parameters["sizes"][axis] = sizes[axis]
        inputs += ["", "sizes"]
    resize = onnx.helper.make_node("Resize", inputs, ["y"], **attributes)
    matrices = []
    for dtype in (np.float64, np.float32):
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        graph = onnx.helper.make_graph(
            [resize],
            "resize_basis",
            [onnx.helper.make_tensor_value_info("x", elem_type, probe_shape)],
            [onnx.helper.make_tensor_value_info("y", elem_type, None)],
            [onnx.numpy_helper.from_array(array, name) for name, array in parameters.items()],
        )
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
        model.ir_version = 10
        feeds = {"x": np.eye(length, dtype=dtype).reshape(probe_shape)}
        if dtype == np.float64:
            (resized,) = onnx.reference.ReferenceEvaluator(model).run(None, feeds)
        else:
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # the unused roi/scales placeholders warn
            session = onnxruntime.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            (resized,) = session.run(None, feeds)
        matrices.append(np.asarray(resized, np.float64).reshape(length, -1))
    return matrices[0], matrices[1]


def _one_source_per_column(matrix: np.ndarray) -> bool:
    return bool(np.isin(matrix, (0.0, 1.0)).all() and (matrix.sum(axis=0) == 1.0).all())


class DecomposeResizePass(ir.passes.InPlacePass):
    """``Resize`` (linear or nearest, constant scales or sizes, NCHW) -> MatMuls by constant interpolation matrices
    (with Transposes for H) or Gathers with constant indices."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
                continue
            plan = plan_resize(node)
            if isinstance(plan, str):
                logger.info("Resize %s left as it is: %s", node.name, plan)
                continue
            x = node.inputs[0]
            assert x is not None
            base = node.outputs[0].name or "resize"
            nodes, result = _decomposition(graph, x, plan, base)
            graph.insert_before(node, nodes)
            node.outputs[0].replace_all_uses_with(result, replace_graph_outputs=True)
            result.name = base
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)


def _decomposition(graph: ir.Graph, x: ir.Value, plan: ResizePlan, base: str) -> tuple[list[ir.Node], ir.Value]:
    """The nodes computing ``plan`` on ``x`` (W first, then H), and the value they end in."""
    assert x.shape is not None
    shape = [int(d) for d in x.shape]
    nodes: list[ir.Node] = []
    current = x

    def append(node: ir.Node, new_shape: list[int]) -> None:
        nonlocal current
        node.outputs[0].dtype, node.outputs[0].shape = x.dtype, ir.Shape(new_shape)
        nodes.append(node)
        current = node.outputs[0]

    for axis in sorted(plan.matrices, reverse=True):
        matrix = plan.matrices[axis]
        shape[axis] = matrix.shape[1]
        if plan.mode == "nearest":
            indices = add_initializer(graph, f"{base}_indices_{axis}", matrix.argmax(axis=0).astype(np.int64))
            append(ir.node("Gather", [current, indices], attributes={"axis": axis}), list(shape))
            continue
        weight = add_initializer(graph, f"{base}_interpolation_{axis}", matrix.astype(x.dtype.numpy()))
        if axis == 3:
            append(ir.node("MatMul", [current, weight]), list(shape))
            continue
        swapped = [shape[0], shape[1], shape[3], shape[2]]
        append(ir.node("Transpose", [current], attributes={"perm": _SWAP_LAST_TWO}), [*swapped[:3], matrix.shape[0]])
        append(ir.node("MatMul", [current, weight]), swapped)
        append(ir.node("Transpose", [current], attributes={"perm": _SWAP_LAST_TWO}), list(shape))
    if not nodes:
        append(ir.node("Identity", [x]), shape)
    return nodes, current
