"""Causal LMs that generate: one integer graph for every sequence length, an integer KV cache, prefill and decode.

:func:`compile_causal_lm` captures a transformers causal LM as one step of generation::

    logits, new_kv = step(input_ids [1, s], position_ids [1, s], keep [1, 1, s, P + s], past_kv [.., P, ..])

with ``s`` and ``P`` symbolic (torch.export's dynamic dimensions): ``s`` new tokens after ``P`` cache slots. The
model's own code appends the new keys and values to the past ones (transformers' cache classes, so whatever an
architecture does to its keys before caching them, RoPE, fused QKV, partial rotary, is what gets cached), and
the boolean ``keep`` says which slots each query attends to (the causal mask, empty slots, a sliding window; the
model gets it as an additive mask, which eager and SDPA attention both take). Before anything is compiled, the
step run in chunks with its cache is checked against the model's own forward pass.
The whole pipeline runs once on that symbolic graph:

- RoPE's tables (and any float function of the positions) become tables read at ``position_ids``
  (:class:`~qcompiler.passes.canonicalize.index_tables.TabulateIndexFunctionsPass`);
- the cache inputs are quantized at the scale and width of the new keys and values appended to them
  (``QuantizeQDQPass(cache_inputs=...)``), so the cache a step writes is the integer tensor the next step reads:
  the graph's cache inputs and outputs are integer codes, with no float at the boundary;
- proofs over a symbolic length (an int32 sum over ``P + s``) use its bound (``s <= chunk``).

The integer graph is then built twice (:func:`~qcompiler.ir.graph.specialize_dims`): for ``s = chunk`` after
``P = max_context - chunk`` slots (prefill, in chunks, reading a copy of the cache's first slots) and for ``s = 1``
after ``P = max_context - 1`` (decode, reading the cache's arrays in place).
It is the same integer model at two lengths, so a token decoded with the cache gets the logits the prefill of the
whole sequence gives it, bit for bit: the integer softmax leaves masked slots out of its maximum and its sum, and
every other op is per token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler import files
from qcompiler.errors import CalibrationError, ContextFullError, ModelLoadError, QCompilerError, TargetError
from qcompiler.files import INTEGER_FILE, REPORT_FILE
from qcompiler.ir.graph import add_initializer, aligned_copy, naming, specialize_dims
from qcompiler.ir.ops import SHAPE_READERS

if TYPE_CHECKING:
    from qcompiler.config import Recipe

logger = logging.getLogger(__name__)

IDS, POSITIONS, KEEP = "input_ids", "position_ids", "keep"
LOGITS = "logits"
PREFILL_FILE, DECODE_FILE = "prefill_{slots}.so", "decode_{slots}.so"  # a library per span (prefill_/decode_spans)
#: decode spans are multiples of the attention kernels' int32 lanes (AVX-512), or of the chunk where it is smaller
DECODE_SPAN_LANES = 16
HEAD_FILE = "head_{rows}.so"  # the row-wise tail (row_tail.py) on 1 row (generation) or a chunk's (logits)
PARAMS_FILE = "weights.bin"  # the libraries' weights, once (backends/tvm/params.py), its index in weights.bin.json
META_FILE = "causal_lm.json"
TOKENIZER_DIR = "tokenizer"  # transformers' tokenizer files, saved beside the model (qcompiler generate reads it)
DEFAULT_CHUNK = 128  # prefill 512 tokens of SmolLM2: 957 ms at 64, 840 at 128, 808 at 256 (attention over every slot)


CACHE_PREFIX = "past_"  # the cache inputs: past_0, past_1, ... (keys and values per layer, the model's order)


def _cache_name(index: int) -> str:
    return f"{CACHE_PREFIX}{index}"


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The cache tensors of one model, in the order the model's cache lists them (keys and values per layer):
    the shape of each for one token (the sequence axis of length 1) and that axis."""

    token_shapes: tuple[tuple[int, ...], ...]
    axis: int  # the sequence axis (transformers: -2 of [batch, heads, seq, head_dim])

    def shape(self, index: int, length: int) -> list[int]:
        shape = list(self.token_shapes[index])
        shape[self.axis] = length
        return shape

    @property
    def count(self) -> int:
        return len(self.token_shapes)


def _transformers_causal_lm(model: Any) -> Any:
    """The transformers model behind ``model`` (a causal LM), or a named refusal."""
    forward = getattr(model, "forward", None)
    config = getattr(model, "config", None)
    if forward is None or config is None or not hasattr(model, "generation_config"):
        raise ModelLoadError(
            f"model: compile_causal_lm takes a transformers causal LM (an *ForCausalLM), got {type(model).__name__}; "
            "compile other models with qcompiler.compile"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"model: {type(model).__name__} is an encoder-decoder; compile_causal_lm takes decoders")
    return model


def _cache_tensors(cache: Any) -> list[Any]:
    """The key and value tensors of a transformers cache, per layer (keys, values, keys, ...)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ModelLoadError(f"model: its cache ({type(cache).__name__}) has no layers; a transformers Cache is needed")
    tensors = []
    for layer in layers:
        tensors += [layer.keys, layer.values]
    return tensors


def _sliding_window(config: Any, max_context: int) -> int | None:
    """A window every layer attends within (Mistral), or None; layers of mixed windows are refused."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window is None or window >= max_context:
        return None
    kinds = set(getattr(text, "layer_types", None) or [])
    if kinds - {"sliding_attention"}:
        raise ModelLoadError(
            f"model: its layers mix sliding-window ({window} tokens) and full attention ({sorted(kinds)}); compile "
            f"with max_context <= {window}, where every layer sees the whole context"
        )
    return int(window)


def _layout(model: Any) -> CacheLayout:
    """The cache of ``model`` measured from two runs (one token, then two): its tensors and their sequence axis."""
    import torch

    with torch.no_grad():
        one = _cache_tensors(model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True).past_key_values)
        two = _cache_tensors(model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True).past_key_values)
    axes = {
        tuple(i for i, (a, b) in enumerate(zip(x.shape, y.shape, strict=True)) if (a, b) == (1, 2))
        for x, y in zip(one, two, strict=True)
    }
    if len(axes) != 1 or len(next(iter(axes))) != 1:
        raise ModelLoadError(f"model: its cache tensors have no one sequence axis ({[tuple(t.shape) for t in two]})")
    axis = next(iter(axes))[0]
    return CacheLayout(tuple(tuple(int(d) for d in t.shape) for t in one), axis)


def _step_module(model: Any, layout: CacheLayout) -> Any:
    """``model`` as one generation step over flat cache tensors (the module torch.export captures)."""
    import torch
    import transformers

    class CachedStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, position_ids: Any, keep: Any, past: list[Any]) -> tuple[Any, ...]:
            pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
            cache = transformers.DynamicCache(ddp_cache_data=pairs)
            # additive (0 or the dtype's lowest): eager attention adds it, SDPA takes it as is; the exported
            # Where(keep, 0, lowest) is the mask form the softmax groups read
            mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
            out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                             past_key_values=cache, use_cache=True)  # fmt: skip
            count = input_ids.shape[1]
            new = [t.narrow(layout.axis, t.shape[layout.axis] - count, count) for t in _cache_tensors(cache)]
            return (out.logits, *new)

    return CachedStep().eval()


def prefill_spans(chunk: int, max_context: int) -> list[int]:
    """The attention spans (cache slots read plus the new tokens) of the prefill and decode libraries:
    ``2, 4, 8, ... x chunk`` below ``max_context``, then ``max_context``. A step runs on the smallest span that holds
    the cache: it attends over twice what is filled at most, not over ``max_context`` (a library costs code alone:
    the weights are shared)."""
    spans = []
    span = 2 * chunk
    while span < max_context:
        spans.append(span)
        span *= 2
    return [*spans, max_context]


def decode_spans(chunk: int, max_context: int) -> list[int]:
    """The spans of the decode libraries: :func:`prefill_spans` and, between each two of them, three quarters of
    the larger (rounded down to a multiple of the vector lanes, 16, or of the chunk where that is smaller). A token
    attends over at most 4/3 of what is filled, where the prefill spans alone would give twice; a decode library is
    small and quick to build (measured on SmolLM2: about 12 s and 4 MB), and it serves every later token."""
    spans = prefill_spans(chunk, max_context)
    step = math.gcd(chunk, DECODE_SPAN_LANES)
    between = [(larger * 3 // 4) // step * step for larger in spans[1:]]
    return sorted({*spans, *(s for s, smaller in zip(between, spans, strict=False) if s > smaller)})


def keep_mask(start: int, count: int, slots: int, window: int | None = None) -> np.ndarray:
    """``keep [1, 1, count, slots + count]``: query ``i`` (position ``start + i``) attends to the cache slots
    before ``start`` and to the new tokens up to itself, within ``window`` positions when one is given."""
    query = start + np.arange(count)[:, None]
    key = np.concatenate([np.arange(slots), start + np.arange(count)])[None, :]
    keep = key <= query
    keep[:, :slots] &= np.arange(slots)[None, :] < start
    if window is not None:
        keep &= query - key < window
    return keep[None, None]


def _feeds(ids: np.ndarray, start: int, slots: int, max_context: int, window: int | None) -> dict[str, np.ndarray]:
    count = ids.shape[1]
    positions = np.minimum(start + np.arange(count), max_context - 1)  # padding past the end reads the last row
    return {IDS: ids.astype(np.int64), POSITIONS: positions[None].astype(np.int64),
            KEEP: keep_mask(start, count, slots, window)}  # fmt: skip


def _token_sequences(calibration: Any) -> list[np.ndarray]:
    """Calibration token ids as ``[1, T]`` int64 arrays (from arrays, lists, or dicts with ``input_ids``)."""
    if calibration is None:
        raise CalibrationError("calibration: required (token id sequences: arrays [1, T] or [T], or dicts of them)")
    sequences = []
    for item in calibration:
        ids: Any = item.get(IDS) if isinstance(item, dict) else item[0] if isinstance(item, tuple) else item
        array = np.asarray(ids.numpy() if hasattr(ids, "numpy") else ids)
        if array.dtype.kind not in "iu" or array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[0] != 1):
            raise CalibrationError(
                f"calibration: expected token ids of shape [1, T] or [T], got {array.dtype} {list(array.shape)}"
            )
        sequences.append(array.reshape(1, -1).astype(np.int64))
    return sequences


def _calibration_feeds(step: Any, layout: CacheLayout, sequences: list[np.ndarray], chunk: int, max_context: int,
                       window: int | None) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:  # fmt: skip
    """Each sequence in chunks of ``chunk`` tokens through the float step, its cache carried from chunk to chunk:
    the feeds the symbolic graph is calibrated on (partial chunks at the end are left out), and the step's logits
    of the first sequence holding a whole chunk. The past length is symbolic too, so each feed holds just the
    tokens before its chunk (one masked slot for the first chunk), not ``max_context`` slots: calibration memory
    follows the text."""
    import torch

    feeds: list[dict[str, np.ndarray]] = []
    first: list[np.ndarray] = []  # the logits of the first sequence that holds a whole chunk
    for ids in sequences:
        recording = not first
        usable = min(ids.shape[1], max_context) // chunk * chunk
        cache = [np.zeros(layout.shape(i, usable), np.float32) for i in range(layout.count)]
        for start in range(0, usable, chunk):
            slots = max(start, 1)
            feed = _feeds(ids[:, start : start + chunk], start, slots, max_context, window)
            feed.update({_cache_name(i): _slots(cache[i], layout.axis, slots) for i in range(layout.count)})
            feeds.append(feed)
            with torch.no_grad():
                args = [torch.from_numpy(feed[n]) for n in (IDS, POSITIONS, KEEP)]
                out = step(*args, [torch.from_numpy(feed[_cache_name(i)]) for i in range(layout.count)])
            if recording:
                first.append(out[0][0].numpy())
            for i, new in enumerate(out[1:]):
                _write(cache[i], layout.axis, start, new.numpy())
    if not feeds:
        raise CalibrationError(
            f"calibration: no sequence holds a whole chunk of {chunk} tokens; give longer sequences or a smaller chunk"
        )
    return feeds, np.concatenate(first)


#: the cached float step against the model's own forward pass: ``max |a - b| / max |b|`` of the logits
STEP_TOLERANCE = 1e-4


def _check_step(model: Any, sequences: list[np.ndarray], logits: np.ndarray) -> None:
    """The float step, run in chunks with its cache, gives the model's own logits (the captured mask, positions
    and cache are what the model means): else a named refusal."""
    import torch

    ids = next(s for s in sequences if s.shape[1] >= logits.shape[0])[:, : logits.shape[0]]  # that sequence
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits[0].numpy()
    error = float(np.abs(logits - expected).max() / max(float(np.abs(expected).max()), 1e-30))
    if not error <= STEP_TOLERANCE:
        raise ModelLoadError(
            f"model: {type(model).__name__} run one chunk at a time with its cache gives logits {error:.1e} away from "
            "its own forward pass (it computes positions or masks from more than position_ids and a 4-D attention "
            "mask, e.g. ALiBi from a 2-D mask); compile it without a cache with qcompiler.compile"
        )


def _along(array: np.ndarray, axis: int, part: slice) -> np.ndarray:
    """``array[..., part, ...]`` with ``part`` on ``axis`` (a view)."""
    index = [slice(None)] * array.ndim
    index[axis] = part
    return array[tuple(index)]


def _slots(cache: np.ndarray, axis: int, count: int) -> np.ndarray:
    """A copy of the first ``count`` slots of ``cache``."""
    return _along(cache, axis, slice(0, count)).copy()


def _write(cache: np.ndarray, axis: int, start: int, new: np.ndarray) -> None:
    _along(cache, axis, slice(start, start + new.shape[axis]))[...] = new


def _reading_prefix(model: ir.Model, layout: CacheLayout, slots: int) -> ir.Model:
    """``model`` (static, its cache inputs of ``n`` slots) reading the first ``n`` of ``slots`` slots: each cache
    input takes the whole cache and a Slice reads the prefix. A step then reads the filled span of the cache where
    it lies: no copy of it, and not all ``max_context`` slots (the importer folds the Slice into the attention's
    reads)."""
    graph = model.graph
    with naming(graph):
        for position, value in enumerate(list(graph.inputs)):
            if not value.name.startswith(CACHE_PREFIX) or value.shape is None:
                continue
            dims = [int(d) for d in value.shape]
            axis = layout.axis % len(dims)
            if dims[axis] == slots:
                continue
            name = value.name
            whole = ir.Value(name=name, shape=ir.Shape([*dims[:axis], slots, *dims[axis + 1 :]]), type=value.type)
            bounds = [add_initializer(graph, f"{name}_prefix_{what}", np.array([v], np.int64))
                      for what, v in (("start", 0), ("end", dims[axis]), ("axis", axis))]  # fmt: skip
            prefix = ir.Value(name=f"{name}_prefix", shape=value.shape, type=value.type)
            value.name = f"{name}_replaced"
            value.replace_all_uses_with(prefix)
            graph.inputs[position] = whole
            graph.insert_before(graph.node(0), ir.Node("", "Slice", [whole, *bounds], outputs=[prefix]))
    return model


def _integer_cache_io(model: ir.Model, count: int) -> dict[str, float]:
    """The cache inputs and outputs of the integer graph as the integer codes (the QuantizeLinear after each cache
    input and the DequantizeLinear before each cache output dropped); returns each one's scale, after checking
    that every cache output is written at the scale its input is read."""
    graph = model.graph
    scales: dict[str, Any] = {}
    for position, value in enumerate(list(graph.inputs)):
        if not value.name.startswith(CACHE_PREFIX):
            continue
        readers = [use.node for use in value.uses()]
        quantizers = [r for r in readers if r.op_type == "QuantizeLinear"]
        if len(quantizers) != 1 or any(r.op_type not in SHAPE_READERS for r in readers if r is not quantizers[0]):
            raise QCompilerError(f"internal: cache input {value.name} is not read by one QuantizeLinear")
        codes = quantizers[0].outputs[0]
        integer = ir.Value(name=value.name, shape=value.shape, type=ir.TensorType(codes.dtype))
        value.name = f"{value.name}_float"
        graph.inputs[position] = integer
        codes.replace_all_uses_with(integer)
        value.replace_all_uses_with(integer)  # its shape readers (the quantizer goes with the float input)
        scales[integer.name] = quantizers[0].inputs[1].const_value.numpy()
    outputs = list(graph.outputs)
    for position in range(1, len(outputs)):
        producer = outputs[position].producer()
        if producer is None or producer.op_type != "DequantizeLinear" or producer.inputs[0] is None:
            raise QCompilerError(f"internal: cache output {outputs[position].name} is not dequantized integer codes")
        name = _cache_name(position - 1)
        scale = producer.inputs[1].const_value.numpy()
        if not np.array_equal(scale, scales[name]):
            raise QCompilerError(f"internal: cache {name} is written at scale {scale} and read at {scales[name]}")
        codes = producer.inputs[0]
        outputs[position].name = f"new_{name}_float"
        codes.name = f"new_{name}"
        graph.outputs[position] = codes
    graph.outputs[0].name = LOGITS
    ir.passes.common.RemoveUnusedNodesPass()(model)
    if len(scales) != count:
        raise QCompilerError(f"internal: {len(scales)} cache inputs, {count} expected")
    return {k: float(np.asarray(v).max()) for k, v in scales.items()}


def _zero_feed(layout: CacheLayout, chunk: int, max_context: int, window: int | None) -> dict[str, np.ndarray]:
    feed = _feeds(np.zeros((1, chunk), np.int64), chunk, chunk, max_context, window)
    feed.update({_cache_name(i): np.zeros(layout.shape(i, chunk), np.float32) for i in range(layout.count)})
    return feed


def _symbols(model: ir.Model, layout: CacheLayout) -> tuple[str, str]:
    """The exported step's symbols for the new tokens' count and the past slots' (from its inputs' shapes)."""
    ids = model.graph.inputs[0].shape
    cache = model.graph.inputs[3].shape
    found = [None if shape is None else shape[axis] for shape, axis in ((ids, 1), (cache, layout.axis))]
    if any(d is None or isinstance(d, int) or not isinstance(getattr(d, "value", None), str) for d in found):
        raise ModelLoadError(f"model: the exported step has no symbolic sequence and cache lengths ({ids}, {cache})")
    return str(found[0].value), str(found[1].value)  # type: ignore[union-attr]


def runtime_only() -> bool:
    """Make this process load TVM's runtime alone, for a process that only runs saved models (``qcompiler
    generate``, a server): 80 MB instead of 400 (TVM's compiler library, and torch, which TVM's FFI imports when it
    is installed; a saved model needs neither). Call it first: True when it took effect, False when TVM or torch
    was already imported (then nothing changes). Afterwards nothing in this process can compile or import torch.
    """
    if any(name in sys.modules for name in ("tvm", "tvm_ffi", "torch")):
        return False
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    sys.modules["torch"] = None  # type: ignore[assignment]  # an import of torch now fails: TVM's FFI then skips it
    return True


class CausalLM:
    """A compiled causal LM: prefill and decode over an integer KV cache, greedy or sampled generation.

    Not thread-safe: one conversation at a time (the cache is its state); :meth:`reset` starts another.
    """

    def __init__(self, prefills: dict[int, Any], decodes: dict[int, Any],
                 integer_model: ir.Model | onnx.ModelProto | Path, meta: dict[str, Any], report: dict[str, Any],
                 tokenizer: Any = None, heads: dict[int, Any] | None = None) -> None:  # fmt: skip
        #: cache slots read -> the library of a chunk after that many (prefill_spans): a chunk runs on the smallest
        #: that holds the cache, so its attention spans what is filled, not max_context
        self.prefill_modules = dict(sorted(prefills.items()))
        #: cache slots read -> the library of a token after that many (``span - 1`` per span): the same
        self.decode_modules = dict(sorted(decodes.items()))
        #: rows -> the library of the logits' row-wise tail on that many rows (1, and a chunk's), when the prefill
        #: libraries stop at the tail's input (``meta["head_input"]``); empty: they compute the logits themselves
        self.head_modules = dict(heads or {})
        self.tokenizer = tokenizer  # a transformers tokenizer, when the model was compiled with one
        self._integer = integer_model  # a loaded model's graph stays in its file until asked for
        self.meta = meta
        self.report = report
        self.max_context = int(meta["max_context"])
        self.chunk = int(meta["chunk"])
        self.window = meta.get("window")
        self.layout = CacheLayout(tuple(tuple(s) for s in meta["token_shapes"]), int(meta["axis"]))
        self.cache_dtypes = [np.dtype(d) for d in meta["cache_dtypes"]]
        self.length = 0
        # max_context - 1 slots (the last token's keys are never read again): the arrays go to every library as
        # they are, shared with it (no copy per step), and a library reads the first slots of its span in them
        # (spans are multiples of the kernels' vector lanes: 195 ms a chunk of 128 on SmolLM2 over 2048 positions,
        # against 317 ms over 2047 + 128)
        self.cache = [
            aligned_copy(np.zeros(self.layout.shape(i, self.slots), dtype)) for i, dtype in enumerate(self.cache_dtypes)
        ]
        self._shared: list[Any] | None = None

    @property
    def slots(self) -> int:
        """Cache slots a decode step reads: ``max_context - 1``."""
        return self.max_context - 1

    @property
    def prefill_slots(self) -> int:
        """The most cache slots a prefill chunk reads: ``max_context - chunk``."""
        return max(self.prefill_modules)

    @property
    def prefill_module(self) -> Any:
        """The library of a chunk after :attr:`prefill_slots` slots (attention over ``max_context`` positions)."""
        return self.prefill_modules[self.prefill_slots]

    @property
    def decode_module(self) -> Any:
        """The library of a token after :attr:`slots` slots (attention over ``max_context`` positions)."""
        return self.decode_modules[self.slots]

    def _cache_feeds(self) -> list[Any]:
        """The cache as the library's tensors over the same memory (numpy writes are what the next step reads)."""
        if self._shared is None:
            import tvm

            self._shared = [tvm.runtime.from_dlpack(c) for c in self.cache]
        return self._shared

    # --- state ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cached tokens (the next prefill starts a new sequence)."""
        self.length = 0

    @property
    def integer_model(self) -> onnx.ModelProto:
        """The symbolic integer graph (every sequence length up to the chunk), as ONNX."""
        integer = self._integer_graph()
        return ir.serde.serialize_model(integer) if isinstance(integer, ir.Model) else integer

    def _integer_graph(self) -> ir.Model | onnx.ModelProto:
        if isinstance(self._integer, Path):
            self._integer = onnx.load(str(self._integer))
        return self._integer

    @property
    def cache_bytes_per_token(self) -> int:
        return int(sum(np.prod(s) * d.itemsize for s, d in zip(self.layout.token_shapes, self.cache_dtypes,
                                                               strict=True)))  # fmt: skip

    @property
    def weight_bytes(self) -> int:
        """Bytes of the integer graph's constants a decode step streams: all but the tables only a Gather reads
        (the embedding, a positions table: one row a token; SmolLM2's embedding is 28.6 MB)."""
        integer = self._integer_graph()
        model = integer if isinstance(integer, ir.Model) else ir.serde.deserialize_model(integer)
        return sum(
            v.const_value.nbytes
            for v in model.graph.initializers.values()
            if v.const_value is not None and not (v.uses() and all(u.node.op_type == "Gather" for u in v.uses()))
        )

    # --- steps ------------------------------------------------------------------------------------------------
    def _span(self, decode: bool) -> int:
        """The slots of the smallest decode (or prefill) library whose span holds the cache."""
        return next(s for s in (self.decode_modules if decode else self.prefill_modules) if s >= self.length)

    def _run(self, ids: np.ndarray, slots: int | None = None, last_only: bool = False) -> np.ndarray:
        """Run ``ids`` at the current position, one token on the decode library, else one chunk (padded to its
        length) on the prefill library of ``slots``; caches the real ones. Returns the logits of the real tokens
        (``last_only``: of the last one, ``[1, vocab]``; the tail runs on that row alone)."""
        real = ids.shape[1]
        if self.length + real > self.max_context:
            raise ContextFullError(
                f"input_ids: {self.length} cached + {real} new tokens exceed max_context {self.max_context}; "
                "reset() the model, or compile with a larger max_context"
            )
        decode = slots is None
        if slots is None:
            slots = self._span(decode=True)
        module = self.decode_modules[slots] if decode else self.prefill_modules[slots]
        size = 1 if decode else self.chunk
        assert self.length <= slots, "a step runs only where its graph's past holds the cache"
        padded = np.zeros((1, size), np.int64)
        padded[:, :real] = ids
        feeds: dict[str, Any] = _feeds(padded, self.length, slots, self.max_context, self.window)
        feeds.update({_cache_name(i): c for i, c in enumerate(self._cache_feeds())})  # its span read in place
        outputs = module.run(feeds)
        kept = min(real, self.slots - self.length)  # a token in the last slot is never read again
        for i, new in enumerate(outputs[1:]):
            _write(self.cache[i], self.layout.axis, self.length, _along(new, self.layout.axis, slice(0, kept)))
        self.length += real
        first = outputs[0][:, :real]
        if not decode and self.head_modules:  # the prefill library stops at the tail's input: run the tail
            rows = first[:, -1:] if last_only else outputs[0]
            first = self.head_modules[rows.shape[1]].run({self.meta["head_input"]: rows})[0]
            first = first if last_only else first[:, :real]
        return first[0, -1:] if last_only else first[0]

    def prefill(self, input_ids: Any, last_only: bool = False) -> np.ndarray:
        """Append ``input_ids`` (``[1, T]`` or ``[T]``) to the cache, in chunks; returns their logits ``[T, vocab]``
        (``last_only``: the last token's alone, ``[1, vocab]``, what generation reads: no ``[T, vocab]`` array)."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        parts: list[np.ndarray] = []
        start = 0
        while start < ids.shape[1]:
            part = ids[:, start : start + self.chunk]
            whole_chunk = part.shape[1] > 1 and self.length <= self.prefill_slots
            if not whole_chunk:  # one token, or the last slots of the cache: decode steps
                part = part[:, :1]
            slots = self._span(decode=False) if whole_chunk else None
            logits = self._run(part, slots, last_only)
            parts = [logits.copy()] if last_only else [*parts, logits]
            start += part.shape[1]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), np.float32)

    def decode_step(self, token: int) -> np.ndarray:
        """Append one token; returns its logits ``[vocab]``."""
        return self._run(np.array([[int(token)]], np.int64))[0]

    # --- generation -------------------------------------------------------------------------------------------
    def stream(self, input_ids: Any, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, stop: Sequence[int] | int | None = None,
               seed: int | None = None) -> Iterator[int]:  # fmt: skip
        """Yield new tokens one by one after the prompt ``input_ids`` (a new sequence: the cache is reset).

        Greedy with ``temperature = 0`` (the default); else sampled from the softmax at ``temperature``, over the
        ``top_k`` likeliest tokens and the smallest set whose probability reaches ``top_p``. Stops after
        ``max_new_tokens`` or on a token in ``stop`` (yielded).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
        stops = {stop} if isinstance(stop, int) else set(stop or ())
        rng = np.random.default_rng(seed)
        self.reset()
        logits = self.prefill(input_ids, last_only=True)[-1]
        for produced in range(max_new_tokens):
            token = _choose(logits, temperature, top_k, top_p, rng)
            yield token
            if token in stops or produced == max_new_tokens - 1:
                return
            logits = self.decode_step(token)

    def generate(self, input_ids: Any, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, stop: Sequence[int] | int | None = None,
                 seed: int | None = None) -> np.ndarray:  # fmt: skip
        """The prompt followed by its continuation, ``[1, T + new]`` int64 (:meth:`stream`'s tokens)."""
        prompt = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        new = list(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, stop, seed))
        return np.concatenate([prompt, np.array([new], np.int64).reshape(1, -1)], axis=1)

    def logits(self, input_ids: Any) -> np.ndarray:
        """Logits of every position of ``input_ids`` as a new sequence (perplexity): ``[T, vocab]``."""
        self.reset()
        return self.prefill(input_ids)

    # --- files ------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the libraries, their weights (once), the symbolic integer graph and the cache layout; atomically."""
        from qcompiler.api import _save_onnx
        from qcompiler.backends.tvm.params import write_params

        with files.atomic_directory(directory, overwrite) as staging:
            for slots, module in self.decode_modules.items():
                module.export(staging / DECODE_FILE.format(slots=slots))
            for slots, module in self.prefill_modules.items():
                module.export(staging / PREFILL_FILE.format(slots=slots))
            for rows, module in self.head_modules.items():
                module.export(staging / HEAD_FILE.format(rows=rows))
            modules = [*self.decode_modules.values(), *self.prefill_modules.values(), *self.head_modules.values()]
            keys = write_params(staging / PARAMS_FILE, [m.params for m in modules])
            meta = {**self.meta, "decode_slots": list(self.decode_modules), "prefill_slots": list(self.prefill_modules),
                    "head_rows": list(self.head_modules), "param_keys": keys}  # fmt: skip
            _save_onnx(self._integer_graph(), staging / INTEGER_FILE)
            (staging / META_FILE).write_text(json.dumps(meta, indent=2))
            (staging / REPORT_FILE).write_text(json.dumps(self.report, indent=2, default=str))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> CausalLM:
        """A directory written by :meth:`save`."""
        from qcompiler.backends.tvm.params import read_params
        from qcompiler.backends.tvm.runtime import TVMModule

        root = Path(directory)
        if not (root / META_FILE).is_file():
            raise QCompilerError(f"directory: {root} is not a saved causal LM ({META_FILE} is missing)")
        meta = json.loads((root / META_FILE).read_text())
        steps = [int(s) for s in meta.pop("decode_slots", [])]
        spans = [int(s) for s in meta.pop("prefill_slots", [])]
        head_rows = [int(r) for r in meta.pop("head_rows", [])]
        heads = [HEAD_FILE.format(rows=r) for r in head_rows]
        libraries = [*(DECODE_FILE.format(slots=s) for s in steps), *(PREFILL_FILE.format(slots=s) for s in spans),
                     *heads]  # fmt: skip
        for name in (*libraries, PARAMS_FILE, INTEGER_FILE):
            if not (root / name).is_file():
                raise QCompilerError(f"directory: {root} is not a saved causal LM ({name} is missing)")
        names, dtypes = meta["input_names"], meta["input_dtypes"]
        weights = read_params(root / PARAMS_FILE)
        loaded = [
            TVMModule.load(root / name, *([[meta["head_input"]], [meta["head_dtype"]]] if name in heads
                                          else [names, dtypes]), params=[weights[k] for k in keys])
            for name, keys in zip(libraries, meta.pop("param_keys"), strict=True)
        ]  # fmt: skip
        decodes, prefills = loaded[: len(steps)], loaded[len(steps) : len(steps) + len(spans)]
        tails = loaded[len(steps) + len(spans) :]
        report = json.loads((root / REPORT_FILE).read_text()) if (root / REPORT_FILE).is_file() else {}
        tokenizer = None
        if (root / TOKENIZER_DIR).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR))
        return cls(dict(zip(spans, prefills, strict=True)), dict(zip(steps, decodes, strict=True)), root / INTEGER_FILE,
                   meta, report, tokenizer, dict(zip(head_rows, tails, strict=True)))  # fmt: skip


def _choose(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, rng: Any) -> int:
    if temperature == 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    probabilities = np.exp(scaled[order] - scaled[order[0]])
    probabilities /= probabilities.sum()
    if top_p is not None:
        keep = int(np.searchsorted(np.cumsum(probabilities), top_p) + 1)
        order, probabilities = order[:keep], probabilities[:keep] / probabilities[:keep].sum()
    return int(order[rng.choice(len(order), p=probabilities)])


def compile_causal_lm(
    model: Any,
    target: str = "llvm",
    *,
    calibration: Any,
    recipe: str | Path | Recipe = "w8a8-llm",
    max_context: int = 2048,
    chunk: int = DEFAULT_CHUNK,
    tokenizer: Any = None,
    verify: bool = True,
    progress: bool = True,
) -> CausalLM:
    """Compile a transformers causal LM for generation with an integer KV cache.

    Args:
        model: a transformers ``*ForCausalLM`` (in eval mode).
        target: a CPU target (``"llvm"``); the cache path is CPU-only for now.
        calibration: token id sequences (arrays ``[1, T]`` or ``[T]``, or dicts with ``input_ids``), run in chunks
            of ``chunk`` tokens with the cache carried between them.
        recipe: an integer-path recipe (``w8a8-llm``, ``w4a8``, ...).
        max_context: cache slots: the longest sequence (prompt and continuation) a conversation holds.
        chunk: tokens per prefill call (a prompt runs in chunks of this many, the last one padded).
        tokenizer: the model's transformers tokenizer: saved with it, for ``qcompiler generate``.

    Raises:
        ModelLoadError: not a transformers causal LM, or its cache has no one sequence axis.
        CalibrationError: no calibration sequence holds a whole chunk.
    """
    import torch
    from torch.export import Dim

    from qcompiler.api import _quantize_to_integer
    from qcompiler.backends.tvm.build import build, resolve_target
    from qcompiler.backends.tvm.params import share_params
    from qcompiler.config import load_recipe
    from qcompiler.ir import load as load_model
    from qcompiler.ir.analysis.row_tail import row_tail, split_at
    from qcompiler.ir.ort_session import serialize_sharing_weights
    from qcompiler.passes.canonicalize.index_tables import TabulateIndexFunctionsPass
    from qcompiler.passes.canonicalize.product_scalars import MoveProductScalarsLeftPass
    from qcompiler.progress import recording, step

    if not 2 <= chunk < max_context:
        raise ValueError(f"chunk: must lie in [2, max_context = {max_context}), got {chunk}")
    tvm_target, _ = resolve_target(target)
    if tvm_target.kind.name != "llvm":
        raise TargetError(f"target {tvm_target.kind.name}: compile_causal_lm builds for CPUs (llvm) for now")
    chosen = load_recipe(recipe)
    lm = _transformers_causal_lm(model).eval()
    window = _sliding_window(lm.config, max_context)
    layout = _layout(lm)
    step_module = _step_module(lm, layout)
    sequences = _token_sequences(calibration)
    start = time.perf_counter()
    with recording() as stages:
        with step("calibration feeds (float, cache carried)", progress):
            try:
                feeds, logits = _calibration_feeds(step_module, layout, sequences, chunk, max_context, window)
            except (RuntimeError, ValueError, TypeError, IndexError) as failure:
                if isinstance(failure, CalibrationError):
                    raise
                raise ModelLoadError(
                    f"model: {type(lm).__name__} does not run as a cached step (input ids, position ids, a 4-D "
                    f"additive attention mask and a DynamicCache): {type(failure).__name__}: {failure}; compile it "
                    "without a cache with qcompiler.compile"
                ) from failure
            _check_step(lm, sequences, logits)
        # an example of two or more past slots: torch.export would take a length of 1 for a constant
        example = next((f for f in feeds if f[KEEP].shape[3] - f[KEEP].shape[2] >= 2), None) or _zero_feed(
            layout, chunk, max_context, window
        )
        seq, past = Dim("seq", min=1, max=chunk), Dim("past", min=1, max=max_context)
        dynamic = {IDS: {1: seq}, POSITIONS: {1: seq}, KEEP: {2: seq, 3: Dim.AUTO},
                   "past": [{layout.axis % len(s): past} for s in layout.token_shapes]}  # fmt: skip
        args = [torch.from_numpy(example[IDS]), torch.from_numpy(example[POSITIONS]), torch.from_numpy(example[KEEP]),
                [torch.from_numpy(example[_cache_name(i)]) for i in range(layout.count)]]  # fmt: skip
        with step("export (torch.export, symbolic lengths)", progress), torch.no_grad():
            try:
                exported = load_model(step_module, args, dynamic_shapes=dynamic)
            except ModelLoadError as failure:
                raise ModelLoadError(
                    f"model: the cached step of {type(lm).__name__} could not be captured with symbolic lengths "
                    f"(new tokens up to {chunk}, past up to {max_context}); compile it without a cache with "
                    f"qcompiler.compile. {failure}"
                ) from failure
        symbols = _symbols(exported, layout)
        keep = exported.graph.inputs[2]  # torch.export cannot write its last dim as seq + past: it is that
        keep.shape = ir.Shape([1, 1, symbols[0], f"{symbols[0]} + {symbols[1]}"])
        TabulateIndexFunctionsPass({POSITIONS: max_context})(exported)
        # the keys' scalar moves to the query: the cache is then read as it lies (no requantize of it per step)
        MoveProductScalarsLeftPass()(exported)
        cache_names = frozenset(_cache_name(i) for i in range(layout.count))
        result = _quantize_to_integer(exported, None, feeds, chosen, verify, progress, cache_inputs=cache_names,
                                      dim_bounds={symbols[0]: chunk, symbols[1]: max_context},
                                      keep_qdq=False)  # fmt: skip
        integer = result.model
        scales = _integer_cache_io(integer, layout.count)
        # a prefill chunk stops where the logits' row-wise tail begins (the last layer's MLP, the final norm, the
        # LM head): the tail runs on the one row generation reads, or on the chunk's rows for logits()
        tail = row_tail(integer.graph, integer.graph.outputs[0])
        body, head = split_at(integer, tail[0]) if tail is not None else (integer, None)
        modules: list[Any] = []
        shared: dict[str, Any] = {}  # the weights' tensors, by digest (params.share_params)
        # a step attends over its span (a multiple of the kernels' vector lanes when the chunk is): a chunk after
        # span - chunk slots, a token after span - 1
        spans = prefill_spans(chunk, max_context)
        builds = [(integer, 1, span - 1) for span in decode_spans(chunk, max_context)]
        builds += [(body, chunk, span - chunk) for span in spans]
        builds += [(head, rows, 0) for rows in (1, chunk) if head is not None]
        for graph, length, slots in builds:
            what = f"{length}-token steps after {slots} slots"
            if graph is head:
                what = f"the logits' row-wise tail on {length} row" + "s" * (length > 1)
            with step(f"build for {what}", progress):
                static = specialize_dims(graph, {symbols[0]: length, symbols[1]: slots})
                if graph is not head:  # every step takes the whole cache and reads its span in it
                    _reading_prefix(static, layout, max_context - 1)
                shapes = {v.name: [int(d) for d in v.shape] for v in static.graph.inputs}
                proto, weights = serialize_sharing_weights(static)
                modules.append(build(proto, shapes, tvm_target, weights=weights, progress=False, lift_weights=True))
                share_params(modules[-1:], shared)  # every build packs the same weights: one copy runs them all
    inputs = integer.graph.inputs
    meta = {
        "max_context": max_context,
        "chunk": chunk,
        "window": window,
        "axis": layout.axis,
        "token_shapes": [list(s) for s in layout.token_shapes],
        "cache_dtypes": [v.dtype.numpy().name for v in inputs if v.name in cache_names],
        "cache_scales": scales,
        "input_names": [v.name for v in inputs],
        "input_dtypes": [v.dtype.numpy().name for v in inputs],
    }
    if tail is not None:
        meta.update(head_input=tail[0].name, head_dtype=tail[0].dtype.numpy().name)
    report = {
        "recipe": result.recipe.name,
        "target": str(tvm_target),
        "passes": [r.as_dict() for r in result.records],
        "seconds": time.perf_counter() - start,
        "stages": stages,
        "max_context": max_context,
        "chunk": chunk,
    }
    built = list(zip(builds, modules, strict=True))
    decodes = {slots: module for (graph, length, slots), module in built if graph is integer and length == 1}
    prefills = {slots: module for (graph, length, slots), module in built if graph is body and length == chunk}
    heads = {rows: module for (graph, rows, _), module in built if graph is head}
    compiled = CausalLM(prefills, decodes, integer, meta, report, tokenizer, heads)
    report["cache_bytes_per_token"] = compiled.cache_bytes_per_token
    return compiled
