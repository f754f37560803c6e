"""Region analysis: where the float-exact transforms (norm folding, scale migration, rotations) can go.

Passes never look for layer names. They ask this module, which reads the graph alone (a networkx view of the
onnx_ir graph for the connectivity questions) for:

- **linear groups**: a tensor and every linear with a constant weight that reads it (``MatMul`` with a 2-D
  constant right operand, ``Gemm``), seen through flattening ``Reshape``s that keep the last axis;
- **norms** and the linears reading their outputs (where a norm gain can fold);
- **residual streams**: tensors joined by residual ``Add``s, with every writer (a linear or an embedding
  lookup), every norm that reads them and every linear that reads those norms;
- **scale sites**: a linear group whose input channels can be divided by any positive ``s`` exactly, because its
  producer absorbs ``1 / s`` (a norm's gain and shift, a linear writer's output columns, or the linear writing
  one factor of a gated product ``a * b``): where SmoothQuant and AWQ migrate scales;
- **attention heads**: the V projection -> ``Reshape`` to heads -> ``P @ V`` -> merge heads -> output
  projection path, where a per-head rotation of size head_dim is exact (grouped-query attention included:
  ``Expand`` copies whole heads);

and for each region the reasons a transform cannot apply, naming the node. ``report(model)`` puts it together;
``qcompiler inspect MODEL`` prints it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import networkx as nx
import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import const_array, consumers, is_graph_output, node_label
from qcompiler.ir.ops import ELEMENTWISE_NONLINEAR, NORM_OPS


@dataclasses.dataclass(frozen=True)
class Linear:
    """A linear op with a constant weight: ``y = x W (+ b)`` with W read from input ``weight_index``.

    ``in_axis`` is the axis of the stored weight array that contracts with the activation (0 for MatMul and
    Gemm without transB, 1 for Gemm with transB); ``bias_index`` the input holding the bias, if any.
    """

    node: ir.Node
    weight_index: int
    in_axis: int
    bias_index: int | None

    @property
    def weight(self) -> np.ndarray:
        array = const_array(self.node.inputs[self.weight_index])
        assert array is not None
        return array

    @property
    def bias(self) -> np.ndarray | None:
        if self.bias_index is None:
            return None
        return const_array(self.node.inputs[self.bias_index])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[self.in_axis])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1 - self.in_axis])

    @property
    def label(self) -> str:
        return node_label(self.node)


def as_linear(node: ir.Node, activation: ir.Value | None = None) -> Linear | None:
    """``node`` as a :class:`Linear` if it is one (and reads ``activation`` as its data input, when given)."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    if activation is not None and node.inputs[0] is not activation:
        return None
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or node.inputs[0] is None or const_array(node.inputs[0]) is not None:
        return None
    if node.op_type == "MatMul":
        return Linear(node, 1, 0, None)
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return None
        bias = 2 if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if bias is not None and const_array(node.inputs[2]) is None:
            return None
        return Linear(node, 1, 1 if attrs.get_int("transB", 0) else 0, bias)
    return None


#: named symbolic dims as the negative ints :func:`static_shape` gives them (equal names, equal ints)
_SYMBOLS: dict[str, int] = {}


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """``value``'s shape for the region analyses, or None: static dims as they are, and named symbolic ones (a
    graph compiled for every sequence length has symbolic leading axes) as distinct negative ints, equal where the
    names are, so that shapes compare as they should and no analysis takes a symbol for a size. The last axis (the
    features the analyses act on) must be static."""
    if value is None or value.shape is None:
        return None
    dims = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif getattr(dim, "value", None) is not None:
            dims.append(_SYMBOLS.setdefault(str(dim.value), -1 - len(_SYMBOLS)))
        else:
            return None
    if dims and dims[-1] < 0:
        return None
    return tuple(dims)


def _keeps_last_axis_reshape(node: ir.Node) -> bool:
    """A Reshape that only regroups the leading axes (the last axis, whole, stays last)."""
    if node.op_type != "Reshape":
        return False
    before, after = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    return before is not None and after is not None and len(before) > 0 and len(after) > 0 and before[-1] == after[-1]


def linear_readers(value: ir.Value) -> tuple[list[Linear], list[str]]:
    """The linears reading ``value`` (directly or through last-axis-keeping Reshapes) and, for every other
    reader, why it is not one."""
    linears: list[Linear] = []
    others: list[str] = []
    for node in consumers(value):
        linear = as_linear(node, value)
        if linear is not None:
            linears.append(linear)
        elif _keeps_last_axis_reshape(node) and node.inputs[0] is value:
            inner, rest = linear_readers(node.outputs[0])
            linears += inner
            others += rest
        else:
            others.append(f"{node_label(node)} ({node.op_type}) reads it and is not a linear with a constant weight")
    return linears, others


def linear_writer(value: ir.Value) -> Linear | None:
    """The linear that produces ``value`` (directly or through a last-axis-keeping Reshape read by nothing
    else), or None."""
    node = value.producer()
    if node is None:
        return None
    linear = as_linear(node)
    if linear is not None:
        return linear if len(consumers(value)) >= 1 else None
    if _keeps_last_axis_reshape(node) and len(consumers(node.inputs[0])) == 1:
        return linear_writer(node.inputs[0])
    return None


def to_networkx(graph: ir.Graph) -> nx.DiGraph:
    """Nodes of ``graph`` as a DiGraph (edges follow values), each networkx node being the ``ir.Node``."""
    view = nx.DiGraph()
    for node in graph:
        view.add_node(node)
        for value in node.inputs:
            if value is not None and value.producer() is not None:
                view.add_edge(value.producer(), node)
    return view


# -- norms ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NormRegion:
    """A norm and the linears reading its output; ``blockers`` say why its gain cannot fold into them."""

    norm: ir.Node
    readers: list[Linear]
    blockers: list[str]

    @property
    def gain(self) -> np.ndarray | None:
        return const_array(self.norm.inputs[1]) if len(self.norm.inputs) > 1 else None

    @property
    def shift(self) -> np.ndarray | None:
        return const_array(self.norm.inputs[2]) if len(self.norm.inputs) > 2 else None

    @property
    def weightless(self) -> bool:
        gain, shift = self.gain, self.shift
        return (gain is None or bool(np.all(gain == 1))) and (shift is None or not np.any(shift))


def _norm_axis_is_last(node: ir.Node) -> bool:
    shape = static_shape(node.inputs[0])
    axis = node.attributes.get_int("axis", -1)
    return shape is not None and axis in (-1, len(shape) - 1)


def norm_regions(graph: ir.Graph) -> list[NormRegion]:
    regions = []
    for node in graph:
        if node.op_type not in NORM_OPS or node.domain not in ("", "ai.onnx"):
            continue
        blockers = []
        if not _norm_axis_is_last(node):
            blockers.append(f"{node_label(node)}: normalises more than the last axis, or its shape is not static")
        for index in (1, 2):
            if len(node.inputs) > index and node.inputs[index] is not None and const_array(node.inputs[index]) is None:
                blockers.append(f"{node_label(node)}: its gain or shift is computed at run time")
        readers, others = linear_readers(node.outputs[0])
        blockers += others
        if is_graph_output(graph, node.outputs[0]):
            blockers.append(f"{node_label(node)}: its output is a graph output")
        regions.append(NormRegion(node, readers, blockers))
    return regions


# -- residual streams -------------------------------------------------------------------------------------


@dataclasses.dataclass
class ResidualStream:
    """Tensors joined by residual Adds, with what writes them and what reads them.

    A rotation ``x -> x Q`` of the stream is exact when every writer absorbs Q on its output side (linears:
    ``W Q``; embedding tables: ``E Q``), every reader absorbs ``Q^T`` on its input side (the linears after each
    weightless RMSNorm, or reading the stream directly), and every norm on the stream commutes with Q (a
    weightless RMSNormalization over the last axis). ``blockers`` list what prevents it.
    """

    hidden: int
    values: list[ir.Value]
    adds: list[ir.Node]
    writers: list[Linear]
    embeddings: list[ir.Node]  # Gather nodes from a constant table
    norms: list[NormRegion]
    readers: list[Linear]  # linears reading the stream directly
    blockers: list[str]
    #: what blocks the stream whatever its norms are (writers, readers, graph inputs and outputs)
    structure_blockers: list[str] = dataclasses.field(default_factory=list)

    @property
    def all_readers(self) -> list[Linear]:
        return self.readers + [r for norm in self.norms for r in norm.readers]


def _residual_add(node: ir.Node) -> bool:
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    if a is None or b is None or const_array(a) is not None or const_array(b) is not None:
        return False
    sa, sb = static_shape(a), static_shape(b)
    return sa is not None and sa == sb and len(sa) >= 2


def _embedding(node: ir.Node | None) -> bool:
    if node is None or node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
        return False
    table = const_array(node.inputs[0])
    return table is not None and table.ndim == 2


def residual_streams(graph: ir.Graph) -> list[ResidualStream]:
    adds = [node for node in graph if _residual_add(node)]
    joined = nx.Graph()
    for node in adds:
        joined.add_node(node.outputs[0])
        for value in node.inputs:
            joined.add_edge(node.outputs[0], value)
    add_set = {id(n) for n in adds}
    norms_by_node = {id(r.norm): r for r in norm_regions(graph)}
    streams = []
    for component in nx.connected_components(joined):
        values = sorted(component, key=lambda v: v.name or "")
        norms: list[NormRegion] = []
        for value in values:
            for node in consumers(value):
                if id(node) in norms_by_node and node.inputs[0] is value:
                    norms.append(norms_by_node[id(node)])
        if not norms:
            continue  # an Add of two computed tensors that no norm reads (RoPE's halves, say): not a stream
        streams.append(_describe_stream(graph, values, add_set, norms))
    return streams


def _describe_stream(graph: ir.Graph, values: list[ir.Value], add_set: set[int], norms: list[NormRegion]):
    blockers: list[str] = []
    writers: list[Linear] = []
    embeddings: list[ir.Node] = []
    readers: list[Linear] = []
    stream_adds: dict[int, ir.Node] = {}
    hidden = static_shape(values[0])[-1]  # type: ignore[index]
    norm_ids = {id(r.norm) for r in norms}
    for value in values:
        producer = value.producer()
        if producer is not None and id(producer) in add_set:
            stream_adds[id(producer)] = producer
        elif _embedding(producer):
            embeddings.append(producer)
        elif (writer := linear_writer(value)) is not None:
            writers.append(writer)
        elif producer is None:
            blockers.append(f"graph input {value.name!r} feeds the residual stream")
        else:
            blockers.append(
                f"{node_label(producer)} ({producer.op_type}) writes into the residual stream and is not a linear "
                "with a constant weight or an embedding lookup"
            )
        if is_graph_output(graph, value):
            blockers.append(f"the residual stream tensor {value.name!r} is a graph output")
        for node in consumers(value):
            if id(node) in add_set or id(node) in norm_ids:
                continue
            linear = as_linear(node, value)
            if linear is not None:
                readers.append(linear)
            elif _keeps_last_axis_reshape(node) and node.inputs[0] is value:  # flattened for a Gemm
                inner, others = linear_readers(node.outputs[0])
                readers += inner
                blockers += others
            else:
                blockers.append(f"{node_label(node)} ({node.op_type}) reads the residual stream")
    structure = list(blockers)
    for region in norms:
        norm = region.norm
        if norm.op_type == "LayerNormalization":
            blockers.append(
                f"{node_label(norm)} (LayerNormalization) subtracts the mean, which does not commute with a "
                "rotation: run layernorm-to-rmsnorm first (a zero-mean residual stream makes it an RMSNorm)"
            )
        elif not region.weightless:
            blockers.append(f"{node_label(norm)} has a gain: run fold-norm-gains first")
        blockers += region.blockers
    return ResidualStream(
        hidden, values, list(stream_adds.values()), writers, embeddings, norms, readers, blockers, structure
    )


# -- attention heads --------------------------------------------------------------------------------------


@dataclasses.dataclass
class HeadPair:
    """A value projection and the output projection that reads its heads after ``P @ V``.

    A per-head rotation ``R`` of size ``head_dim`` (``W_v -> W_v (I (x) R)``, ``W_o -> (I (x) R)^T W_o``) is
    exact: every op in between moves whole head_dim blocks (the attention product mixes tokens, not channels).
    """

    v: Linear
    o: Linear | None
    head_dim: int | None
    blockers: list[str]


def _writes_cache_output(node: ir.Node) -> bool:
    """A Slice or Identity whose outputs are graph outputs read by nothing else: the new values written to a KV
    cache output (a move; the graph reads them back as a cache input, in whatever basis it wrote them)."""
    graph = node.graph
    return (
        node.op_type in ("Slice", "Identity")
        and graph is not None
        and all(is_graph_output(graph, out) and not out.uses() for out in node.outputs)
    )


def _appends_to_cache(node: ir.Node, value: ir.Value, shape: tuple[int, ...] | None) -> bool:
    """``node`` is ``Concat(past, value)`` along an axis before the channels, ``past`` a graph input (a KV cache)."""
    if node.op_type != "Concat" or shape is None or len(node.inputs) != 2 or node.inputs[1] is not value:
        return False
    past = node.inputs[0]
    axis = node.attributes.get_int("axis", 0) % len(shape)
    return past is not None and past.producer() is None and const_array(past) is None and axis != len(shape) - 1


@dataclasses.dataclass
class _ValuePath:
    """Where V's output leads (:func:`_trace_value_path`)."""

    o: Linear | None = None  # the linear that reads the merged heads
    head_dim: int | None = None
    through_pv: bool = False  # an attention product read it as V
    cached: bool = False  # a value on the path is written to a KV cache output (:func:`_writes_cache_output`)
    reason: str | None = None  # why the path stops, if it does


def _trace_value_path(start: ir.Value) -> _ValuePath:
    """Follow V's output to the linear that reads the merged heads."""
    path = _ValuePath()
    current = start
    for _ in range(64):
        readers = consumers(current)
        if any(_writes_cache_output(r) for r in readers):
            path.cached = True
            readers = [r for r in readers if not _writes_cache_output(r)]
        if len(readers) != 1:
            return dataclasses.replace(path, reason=f"{current.name!r} has {len(readers)} readers")
        node = readers[0]
        before, after = static_shape(node.inputs[0]), static_shape(node.outputs[0]) if node.outputs else None
        head_dim = path.head_dim
        if node.op_type == "Reshape" and before is not None and after is not None:
            if head_dim is None:
                if len(after) == len(before) + 1 and after[:-2] == before[:-1] and after[-2] * after[-1] == before[-1]:
                    path.head_dim = after[-1]  # [..., heads * d] -> [..., heads, d] (one head included)
                elif after[-1] == before[-1]:
                    pass  # flatten/unflatten around a Gemm
                else:
                    reason = f"{node_label(node)} reshapes the projection's output in an unknown way"
                    return dataclasses.replace(path, reason=reason)
            elif (
                path.through_pv
                and len(before) >= 2
                and after[-1] == before[-2] * before[-1]
                and after[:-1] == before[:-2]
            ):
                linears, others = linear_readers(node.outputs[0])
                if len(linears) == 1 and not others:
                    return dataclasses.replace(path, o=linears[0])
                reason = f"the merged heads {node.outputs[0].name!r} are not read by one linear"
                return dataclasses.replace(path, reason=reason)
            elif after[-1] == head_dim:
                pass  # leading axes regrouped (grouped-query attention's expanded heads)
            else:
                return dataclasses.replace(path, reason=f"{node_label(node)} reshapes across the head_dim axis")
        elif node.op_type == "Transpose":
            rank = len(before) if before is not None else 0
            perm = list(node.attributes.get_ints("perm", list(range(rank))[::-1]))
            if not perm or perm[-1] != len(perm) - 1:
                return dataclasses.replace(path, reason=f"{node_label(node)} moves the channel axis")
        elif node.op_type in ("Unsqueeze", "Expand") and before is not None and after is not None:
            if after[-1] != before[-1]:
                return dataclasses.replace(path, reason=f"{node_label(node)} changes the channel axis")
        elif node.op_type == "MatMul" and node.inputs[1] is current and head_dim is not None:
            path.through_pv = True
        elif _appends_to_cache(node, current, before):
            pass  # the cached values of earlier steps (written by this graph: in the same basis) before the new
        else:
            reason = f"{node_label(node)} ({node.op_type}) is not on an attention value path"
            return dataclasses.replace(path, reason=reason)
        current = node.outputs[0]
    return dataclasses.replace(path, reason="path too long")


def head_pairs(graph: ir.Graph) -> list[HeadPair]:
    """Every linear whose output is split into heads and read as the V operand of an attention product."""
    pairs = []
    for node in graph:
        linear = as_linear(node)
        if linear is None:
            continue
        path = _trace_value_path(node.outputs[0])
        o, head_dim, reason = path.o, path.head_dim, path.reason
        if head_dim is None:
            continue  # never split into heads: not a value projection
        if o is None and not path.through_pv:
            continue  # never reached an attention product as its V operand: a query, key or other projection
        blockers = [] if reason is None else [reason]
        if path.cached:  # rotated values would be cached rotated, and earlier steps' come in from outside the graph
            blockers.append(f"{linear.label}: its values are written to a KV cache output")
        if o is not None and o.in_features % head_dim:
            blockers.append(f"{o.label} reads {o.in_features} features, not a multiple of head_dim {head_dim}")
        pairs.append(HeadPair(linear, o, head_dim, blockers))
    return pairs


# -- online Hadamard sites -------------------------------------------------------------------------------


@dataclasses.dataclass
class HadamardSite:
    """An activation that only linears read and no offline rotation reaches: where an online Hadamard goes.

    ``kind`` is ``"mlp"`` (the output of an elementwise nonlinearity or of a gated product: the input of a
    down projection) or ``"attention"`` (the merged heads read by an output projection).
    """

    value: ir.Value
    readers: list[Linear]
    kind: str
    blockers: list[str]

    @property
    def size(self) -> int | None:
        return self.readers[0].in_features if self.readers else None


def _gated_or_nonlinear(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or not node.outputs:
        return False
    if node.op_type in ELEMENTWISE_NONLINEAR:
        return True
    return node.op_type == "Mul" and len(node.inputs) == 2 and all(const_array(v) is None for v in node.inputs)


def hadamard_sites(graph: ir.Graph) -> list[HadamardSite]:
    """Every down-projection input and every attention output projection input, with blockers."""
    sites: list[HadamardSite] = []
    seen: set[int] = set()

    def add(value: ir.Value, kind: str) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        readers, others = linear_readers(value)
        if not readers:
            return
        blockers = list(others)
        sizes = {r.in_features for r in readers}
        if len(sizes) > 1:
            blockers.append(f"its readers take different widths {sorted(sizes)}")
        sites.append(HadamardSite(value, readers, kind, blockers))

    for node in graph:
        if _gated_or_nonlinear(node):
            add(node.outputs[0], "mlp")
    for pair in head_pairs(graph):
        if pair.o is not None and pair.o.node.inputs[0] is not None:
            add(pair.o.node.inputs[0], "attention")
    return sites


@dataclasses.dataclass
class ScoreSite:
    """An attention score product ``Q K^T`` (both operands computed): where the Q/K rotation after RoPE goes
    (SpinQuant's R3). ``x -> x H`` on ``query`` (the product's first operand) and on ``key`` (the input of the
    Transpose that makes ``K^T``, last axis head_dim) leaves every score unchanged for orthogonal H."""

    product: ir.Node
    query: ir.Value
    transpose: ir.Node | None
    head_dim: int | None
    blockers: list[str]

    @property
    def key(self) -> ir.Value | None:
        return self.transpose.inputs[0] if self.transpose is not None else None


#: ops between K and the score product that keep its head_dim axis intact (GQA expansion, head reshapes, scale)
_KEY_PATH = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity", "Mul", "Div"})


def _score_product(softmax: ir.Node) -> ir.Node | None:
    """The ``MatMul`` of two computed operands feeding ``softmax`` through a mask Add and scalar rescales."""
    value = softmax.inputs[0]
    for _ in range(4):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node if all(v is not None and const_array(v) is None for v in node.inputs) else None
        if node.op_type not in ("Add", "Mul", "Div") or len(node.inputs) != 2:
            return None
        computed = [v for v in node.inputs if v is not None and const_array(v) is None]
        products = [v for v in computed if v.producer() is not None and v.producer().op_type == "MatMul"]
        value = products[0] if products else (computed[0] if len(computed) == 1 else None)
    return None


def _swaps_last_two(node: ir.Node) -> bool:
    perm = node.attributes.get_ints("perm", None)
    if perm is None or len(perm) < 2:
        return False
    n = len(perm)
    return list(perm[:-2]) == list(range(n - 2)) and perm[-2] == n - 1 and perm[-1] == n - 2


def score_sites(graph: ir.Graph) -> list[ScoreSite]:
    """Every ``Q K^T`` product read by a Softmax, with the Transpose of K found through reshapes, GQA expansion
    and scalar rescales, or the reason it was not."""
    sites = []
    for softmax in graph:
        if softmax.op_type != "Softmax":
            continue
        product = _score_product(softmax)
        if product is None:
            continue
        query = product.inputs[0]
        assert query is not None
        q_shape = static_shape(query)
        head_dim = q_shape[-1] if q_shape else None
        blockers: list[str] = []
        if head_dim is None:
            blockers.append(f"{node_label(product)}: the query's head_dim is not static")
        transpose = None
        value = product.inputs[1]
        for _ in range(8):
            node = value.producer() if value is not None else None
            if node is None:
                break
            if node.op_type == "Transpose":
                transpose = node if _swaps_last_two(node) else None
                break
            if node.op_type not in _KEY_PATH:
                break
            if node.op_type in ("Mul", "Div") and not ((c := const_array(node.inputs[1])) is not None and c.size == 1):
                break
            value = node.inputs[0]
        if transpose is None:
            blockers.append(f"{node_label(product)}: no Transpose of the last two axes of K found before it")
        elif (k_shape := static_shape(transpose.inputs[0])) is None or k_shape[-1] != head_dim:
            blockers.append(f"{node_label(transpose)}: K's last axis is not the query's head_dim")
        sites.append(ScoreSite(product, query, transpose, head_dim, blockers))
    return sites


# -- scale sites (SmoothQuant, AWQ) ------------------------------------------------------------------------


@dataclasses.dataclass
class ScaleSite:
    """A tensor read only by linears, with what can absorb ``1 / s`` on its channels: ``norm`` (gain and shift
    of the norm writing it), ``writer`` (output columns of the linear writing it) or ``gated`` (the linear
    writing one factor of the ``Mul`` writing it); ``blockers`` say why none can."""

    value: ir.Value
    readers: list[Linear]
    kind: str | None
    norm: ir.Node | None = None
    writer: Linear | None = None
    blockers: list[str] = dataclasses.field(default_factory=list)


def _scale_site(graph: ir.Graph, value: ir.Value) -> ScaleSite | None:
    readers, others = linear_readers(value)
    if not readers:
        return None
    label = value.name or "?"
    blockers = list(others)
    if is_graph_output(graph, value):
        blockers.append(f"{label} is a graph output")
    width = static_shape(value)
    if width is None or not width or any(r.in_features != width[-1] for r in readers):
        blockers.append(f"{label}: its shape is not static, or a reader contracts more than its last axis")
    node = value.producer()
    site = ScaleSite(value, readers, None, blockers=blockers)
    if node is None:
        site.blockers.append(f"{label} is a graph input: nothing absorbs a scale")
        return site
    if node.op_type in NORM_OPS and node.domain in ("", "ai.onnx"):
        if not _norm_axis_is_last(node):
            site.blockers.append(f"{node_label(node)}: normalises more than the last axis")
        if len(node.inputs) < 2 or const_array(node.inputs[1]) is None:
            site.blockers.append(f"{node_label(node)}: no constant gain to absorb the scale")
        elif len(node.inputs) > 2 and node.inputs[2] is not None and const_array(node.inputs[2]) is None:
            site.blockers.append(f"{node_label(node)}: its shift is computed at run time")
        site.kind, site.norm = "norm", node
        return site
    writer = linear_writer(value)  # its output is ``value`` or only a Reshape to ``value`` reads it
    if writer is not None:
        site.kind, site.writer = "writer", writer
        return site
    if node.op_type == "Mul" and len(node.inputs) == 2 and all(const_array(v) is None for v in node.inputs):
        for factor in node.inputs:
            assert factor is not None
            factor_writer = linear_writer(factor) if static_shape(factor) == width else None
            if factor_writer is not None and len(consumers(factor)) == 1:
                site.kind, site.writer = "gated", factor_writer
                return site
        site.blockers.append(f"{node_label(node)}: no factor of the product is written by a linear only it reads")
        return site
    site.blockers.append(f"{node_label(node)} ({node.op_type}) writes it and cannot absorb a per-channel scale")
    return site


def scale_sites(graph: ir.Graph) -> list[ScaleSite]:
    """Every linear group (a tensor and the linears reading it) with where a per-channel scale can go."""
    seen: set[int] = set()
    sites = []
    for node in graph:
        linear = as_linear(node)
        if linear is None:
            continue
        value = node.inputs[0]
        assert value is not None
        producer = value.producer()
        while producer is not None and _keeps_last_axis_reshape(producer) and len(consumers(value)) == 1:
            value = producer.inputs[0]  # the group's tensor is before a flattening Reshape
            producer = value.producer()
        if id(value) in seen:
            continue
        seen.add(id(value))
        site = _scale_site(graph, value)
        if site is not None:
            sites.append(site)
    return sites


# -- the report -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RegionReport:
    streams: list[ResidualStream]
    norms: list[NormRegion]
    heads: list[HeadPair]
    linears: list[Linear]
    hadamards: list[HadamardSite] = dataclasses.field(default_factory=list)
    scales: list[ScaleSite] = dataclasses.field(default_factory=list)

    def coverage(self) -> dict[str, list[str]]:
        """For every linear (by label): the regions covering it, or the reasons none does."""
        cover: dict[str, list[str]] = {lin.label: [] for lin in self.linears}
        reasons: dict[str, list[str]] = {lin.label: [] for lin in self.linears}
        for index, stream in enumerate(self.streams):
            for role, members in (("reader", stream.all_readers), ("writer", stream.writers)):
                for lin in members:
                    if stream.blockers:
                        reasons[lin.label].append(f"residual #{index} {role}, blocked: {stream.blockers[0]}")
                    else:
                        cover[lin.label].append(f"residual #{index} {role}")
        for pair in self.heads:
            if pair.blockers:
                reasons[pair.v.label].append("head V blocked: " + "; ".join(pair.blockers))
                continue
            cover[pair.v.label].append(f"head V (head_dim {pair.head_dim})")
            if pair.o is not None:
                cover[pair.o.label].append(f"head O (head_dim {pair.head_dim})")
        for site in self.hadamards:
            if not site.blockers:
                for lin in site.readers:
                    cover[lin.label].append(f"online Hadamard ({site.kind}, order {site.size})")
        for norm in self.norms:
            if not norm.blockers:
                for lin in norm.readers:
                    cover[lin.label].append(f"norm gain of {node_label(norm.norm)}")
        for scale in self.scales:
            for lin in scale.readers:
                if scale.blockers:
                    reasons[lin.label].append("scale migration blocked: " + "; ".join(scale.blockers))
                else:
                    cover[lin.label].append(f"scale migration ({scale.kind})")
        out = {}
        for label in cover:
            out[label] = cover[label] or [
                "not covered: "
                + ("; ".join(reasons[label]) or "reads no norm, residual stream or attention value path")
            ]
        return out

    def format(self) -> str:
        lines = [f"{len(self.linears)} linears, {len(self.norms)} norms, {len(self.streams)} residual streams, "
                 f"{len(self.heads)} attention value paths, {len(self.hadamards)} online Hadamard sites"]  # fmt: skip
        for index, stream in enumerate(self.streams):
            state = "rotatable" if not stream.blockers else "blocked"
            lines.append(
                f"residual stream #{index}: hidden {stream.hidden}, {len(stream.adds)} adds, "
                f"{len(stream.norms)} norms, "
                f"{len(stream.embeddings)} embeddings, {len(stream.writers)} writers, "
                f"{len(stream.all_readers)} readers: {state}"
            )
            for reason in _unique(stream.blockers)[:8]:
                lines.append(f"    blocked: {reason}")
        for pair in self.heads:
            target = pair.o.label if pair.o is not None else "?"
            state = "rotatable" if not pair.blockers else "blocked: " + "; ".join(pair.blockers)
            lines.append(f"heads: {pair.v.label} -> {target}, head_dim {pair.head_dim}: {state}")
        for site in self.hadamards:
            state = "ready" if not site.blockers else "blocked: " + "; ".join(site.blockers)
            readers = ", ".join(lin.label for lin in site.readers)
            lines.append(f"online Hadamard ({site.kind}): {site.value.name} -> {readers}, order {site.size}: {state}")
        for scale in self.scales:
            state = f"scalable ({scale.kind})" if not scale.blockers else "blocked: " + "; ".join(scale.blockers)
            readers = ", ".join(lin.label for lin in scale.readers)
            lines.append(f"scale site: {scale.value.name} -> {readers}: {state}")
        lines.append("linears:")
        for label, roles in self.coverage().items():
            lines.append(f"    {label}: {', '.join(roles)}")
        return "\n".join(lines)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def report(model: ir.Model | ir.Graph) -> RegionReport:
    graph = model.graph if isinstance(model, ir.Model) else model
    linears = [lin for node in graph if (lin := as_linear(node)) is not None]
    return RegionReport(
        residual_streams(graph), norm_regions(graph), head_pairs(graph), linears, hadamard_sites(graph),
        scale_sites(graph),
    )  # fmt: skip
