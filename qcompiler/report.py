"""What a compiled model is made of, in one self-contained HTML page (``qcompiler report DIR``,
:meth:`qcompiler.CompiledModel.report_html`).

The page reads ``report.json`` (:meth:`CompiledModel.save`) and the QDQ model: the pass pipeline (time and node
count per pass), the op histogram of the integer graph, the SQNR of every quantized activation against the float
model (``report["layers"]``, measured at compile time by :mod:`qcompiler.ir.analysis.layer_error`), the ranges
and scales of weights and activations, the time per kernel (the profiler, when given) and, for language models,
the rows of ``report["llm"]`` (a list of dicts such as ``{"model": "int8", "perplexity": 28.1, "ms_per_token":
9.5}``, when a benchmark records them). Plots are matplotlib SVG inlined in the page: nothing is fetched when it
is viewed.
"""

from __future__ import annotations

import dataclasses
import html
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from qcompiler import files
from qcompiler.ir.analysis.layer_error import activation_name, dequantize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_HTML = "report.html"
#: kernels drawn in the profile plot (the table lists all)
TOP_KERNELS = 20


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A tensor of the QDQ model as its integer codes represent it: the scales chosen and the float range."""

    name: str
    kind: str  # "activation" or "weight"
    reader: str  # the op reading the dequantized value
    dtype: str
    shape: tuple[int, ...]
    scale_min: float
    scale_max: float
    channels: int
    low: float  # activations: the representable range; weights: the range of the dequantized values
    high: float


def quantized_tensors(model: onnx.ModelProto) -> list[QuantizedTensor]:
    """Every activation (QuantizeLinear) and constant weight (DequantizeLinear of an initializer) in ``model``."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    outputs = {output.name for output in model.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def read_by(value: str) -> str:  # through the DequantizeLinear: the ops computing on the dequantized value
        nodes = readers.get(value, [])
        dequantized = [out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output]
        ops = [n.op_type for out in dequantized for n in readers.get(out, [])]
        if not ops and any(out in outputs for out in dequantized):
            return "graph output"
        return ", ".join(dict.fromkeys(ops or [n.op_type for n in nodes]))

    tensors = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        if node.input[1] not in initializers:
            continue
        scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        zero = numpy_helper.to_array(initializers[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "QuantizeLinear":
            dtype = np.dtype(zero.dtype) if zero is not None else np.dtype(np.uint8)
            info = np.iinfo(dtype)
            offset = zero.astype(np.float64) if zero is not None else 0.0
            low, high = float(np.min((info.min - offset) * scale)), float(np.max((info.max - offset) * scale))
            name, kind, shape = activation_name(node.output[0], node.input[0]), "activation", ()
            reader = read_by(node.output[0])
        elif node.input[0] in initializers:
            codes = numpy_helper.to_array(initializers[node.input[0]])
            values = dequantize(
                codes, scale, zero, int(attributes.get("axis", 1)), int(attributes.get("block_size", 0))
            )
            low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
            name, kind, shape, dtype = node.input[0], "weight", tuple(codes.shape), np.dtype(codes.dtype)
            reader = read_by(node.input[0])
        else:
            continue
        tensors.append(
            QuantizedTensor(
                name, kind, reader, str(dtype), shape, float(scale.min()), float(scale.max()), scale.size, low, high
            )
        )
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# the page


def zero_inputs(compiled: Any) -> dict[str, np.ndarray]:
    """Zeros at a compiled model's input shapes and dtypes: valid for every input (token ids included), and the
    kernels take the same time on them."""
    shapes = compiled.report["input_shapes"]
    dtypes = dict(zip(compiled.module.input_names, compiled.module.input_dtypes, strict=True))
    return {name: np.zeros(shapes[name], dtypes[name]) for name in compiled.input_names}


def write_html(
    path: str | Path,
    report: Mapping[str, Any],
    qdq_model: onnx.ModelProto | None = None,
    kernels: Sequence[Mapping[str, Any]] | None = None,
    title: str = "compiled model",
) -> Path:
    """Write :func:`render_html` to ``path`` (UTF-8, atomically) and return it."""
    return files.write_text(path, render_html(report, qdq_model, kernels, title))


def render_html(
    report: Mapping[str, Any],
    qdq_model: onnx.ModelProto | None = None,
    kernels: Sequence[Mapping[str, Any]] | None = None,
    title: str = "compiled model",
) -> str:
    """The report page: ``report`` as :meth:`CompiledModel.save` writes it, the QDQ model for the ranges and
    scales, and the profiler's rows (:meth:`CompiledModel.profile`) for the kernel times.

    Each section says why it is empty when its data is missing.
    """
    import matplotlib

    tensors: list[QuantizedTensor] | str | None = None
    if qdq_model is not None:
        try:
            tensors = quantized_tensors(qdq_model)
        except Exception as exc:  # one odd tensor costs its section, not the page
            tensors = f"could not read the scales of the QDQ model: {type(exc).__name__}: {exc}"
    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}):
        sections = [
            _summary(report),
            _passes_section(report.get("passes") or []),
            _ops_section(report.get("ops") or {}),
            _layers_section(report.get("layers")),
            _ranges_section(tensors, report.get("layers")),
            _kernels_section(kernels),
            _llm_section(report.get("llm")),
        ]
    body = "\n".join(section for section in sections if section)
    return _PAGE.format(title=_text(title), body=body)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>qcompiler report: {title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 24px 48px; color: #222; }}
h1 {{ font-size: 22px; margin: 24px 0 8px; }}
h2 {{ font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }}
table {{ border-collapse: collapse; font-size: 12px; margin: 8px 0; }}
th, td {{ border: 1px solid #e2e2e2; padding: 2px 8px; text-align: left; vertical-align: top; }}
td:not(:last-child) {{ white-space: nowrap; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
th {{ background: #f5f5f5; }}
figure {{ margin: 8px 0; }}
figure svg {{ max-width: 100%; height: auto; }}
.note {{ color: #666; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }}
dt {{ font-weight: 600; }}
dd {{ margin: 0; }}
</style>
</head>
<body>
<h1>qcompiler report: {title}</h1>
{body}
<script>
// rendered: the plots drawn with a non-zero size (the browser test reads it in the DOM)
var drawn = Array.prototype.filter.call(document.querySelectorAll("figure svg"), function (svg) {{
  var box = svg.getBoundingClientRect();
  return box.width > 0 && box.height > 0;
}});
document.body.setAttribute("data-plots-rendered", String(drawn.length));
</script>
</body>
</html>
"""


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return _text(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{float(value):.{digits}g}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], collapse_over: int = 12) -> str:
    """An HTML table; numbers right-aligned; more than ``collapse_over`` rows fold into a <details>."""
    lines = ["<table><thead><tr>" + "".join(f"<th>{_text(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    count = 0
    for row in rows:
        count += 1
        cells = []
        for cell in row:
            numeric = isinstance(cell, int | float | np.number) and not isinstance(cell, bool)
            cells.append(f'<td class="n">{_number(cell)}</td>' if numeric else f"<td>{_text(cell)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    table = "\n".join(lines)
    if count > collapse_over:
        return f"<details><summary>table ({count} rows)</summary>\n{table}\n</details>"
    return table


def _short(label: str, width: int = 40) -> str:
    """A plot label of at most ``width`` characters (TVM's fused kernel names run to hundreds; tables keep all)."""
    return label if len(label) <= width else label[: width - 1] + "…"


def _section(anchor: str, heading: str, *parts: str) -> str:
    return f'<section id="{anchor}">\n<h2>{_text(heading)}</h2>\n' + "\n".join(p for p in parts if p) + "\n</section>"


def _note(text: str) -> str:
    return f'<p class="note">{_text(text)}</p>'


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, min(height, 40.0)), layout="constrained")


def _svg(figure: Figure, name: str, caption: str) -> str:
    """``figure`` as an inline <svg>: no XML prolog, DOCTYPE, metadata or namespace URLs (the HTML parser puts
    an <svg> in its namespace), and its ids (and the references to them) prefixed by ``name``: matplotlib numbers
    them per figure, and two plots of one page must not share one."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.DOTALL)
    text = re.sub(r'\s+xmlns(?::xlink)?="[^"]*"', "", text)
    text = re.sub(r'\bid="([^"]+)"', rf'id="{name}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{name}-\1)", text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{name}-\1"', text)
    return f'<figure id="plot-{name}">\n{text}\n<figcaption class="note">{_text(caption)}</figcaption>\n</figure>'


def _summary(report: Mapping[str, Any]) -> str:
    seconds = report.get("seconds") or {}
    facts: list[tuple[str, Any]] = [
        ("recipe", report.get("recipe")),
        ("target", report.get("target")),
        ("inputs", ", ".join(f"{name} {list(shape)}" for name, shape in (report.get("input_shapes") or {}).items())),
        ("passes", f"{seconds.get('passes', 0.0):.2f} s"),
        ("build", f"{seconds.get('build', 0.0):.2f} s"),
        ("tuned", report.get("tuned")),
        ("float islands", len(report.get("float_islands") or [])),
    ]
    auto = report.get("auto")
    if auto:
        facts.insert(1, ("auto", f"{auto.get('auto')}: {auto.get('kind')}, so {auto.get('recipe')}"))
    items = "\n".join(f"<dt>{_text(k)}</dt><dd>{_text(v)}</dd>" for k, v in facts if v is not None)
    islands = report.get("float_islands") or []
    island_table = _table(["node", "op", "reason"], [(i["node"], i["op"], i["reason"]) for i in islands])
    return _section("summary", "Summary", f"<dl>\n{items}\n</dl>", island_table if islands else "")


def _passes_section(passes: Sequence[Mapping[str, Any]]) -> str:
    if not passes:
        return _section("passes", "Pass pipeline", _note("no pass records in the report"))
    labels = [f"{i:02d} {p['name']}" for i, p in enumerate(passes)]
    milliseconds = [1e3 * float(p["seconds"]) for p in passes]
    figure = _figure(11, 1.2 + 0.22 * len(passes))
    time_axes, node_axes = figure.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    positions = np.arange(len(passes))
    colours = ["#4c72b0" if p["modified"] else "#b0b0b0" for p in passes]
    time_axes.barh(positions, milliseconds, color=colours)
    time_axes.set_yticks(positions, labels)
    time_axes.invert_yaxis()
    time_axes.set_xlabel("ms (grey: the pass changed nothing)")
    time_axes.set_title("time per pass")
    node_axes.barh(positions, [p["nodes_after"] for p in passes], color="#dd8452")
    for position, record in zip(positions, passes, strict=True):
        change = record["nodes_after"] - record["nodes_before"]
        if change:
            node_axes.annotate(f"{change:+d}", (record["nodes_after"], position), xytext=(3, 0),
                               textcoords="offset points", va="center", fontsize=7)  # fmt: skip
    node_axes.set_xlabel("nodes after the pass (and the change)")
    node_axes.set_title("graph size")
    plot = _svg(figure, "passes", "Each pass of the pipeline in order: its wall time and the node count it left.")

    def changes(record: Mapping[str, Any]) -> str:
        added = [f"+{n} {op}" for op, n in (record.get("added") or {}).items()]
        return ", ".join(added + [f"-{n} {op}" for op, n in (record.get("removed") or {}).items()])

    rows = [
        (label, ms, "yes" if p["modified"] else "no", f"{p['nodes_before']} → {p['nodes_after']}", changes(p))
        for label, ms, p in zip(labels, milliseconds, passes, strict=True)
    ]
    table = _table(["pass", "ms", "modified", "nodes", "changes"], rows)
    total = _note(f"{len(passes)} passes, {sum(milliseconds):.1f} ms in all")
    return _section("passes", "Pass pipeline", total, plot, table)


def _ops_section(ops: Mapping[str, int]) -> str:
    from matplotlib.ticker import MaxNLocator

    if not ops:
        return _section("ops", "Op histogram", _note("no op counts in the report"))
    ordered = sorted(ops.items(), key=lambda item: (-item[1], item[0]))
    figure = _figure(8, 1.0 + 0.24 * len(ordered))
    axes = figure.subplots()
    axes.barh(range(len(ordered)), [count for _, count in ordered], color="#55a868")
    axes.set_yticks(range(len(ordered)), [op for op, _ in ordered])
    axes.invert_yaxis()
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("nodes in the integer graph")
    plot = _svg(figure, "ops", "The ops of the compiled integer graph, most frequent first.")
    return _section("ops", "Op histogram", plot, _table(["op", "count"], ordered))


def _layers_section(layers: Sequence[Mapping[str, Any]] | None) -> str:
    heading = "Per-layer error (SQNR against float)"
    if not layers:
        return _section("layers", heading, _note("not measured for this model (report['layers'] is absent)"))
    finite = [(i, row) for i, row in enumerate(layers) if row.get("sqnr_db") is not None]
    figure = _figure(11, 3.6)
    axes = figure.subplots()
    style = "o-" if len(finite) <= 100 else "o"  # a line through hundreds of layers hides more than it joins
    axes.plot([i for i, _ in finite], [row["sqnr_db"] for _, row in finite], style, markersize=3, color="#4c72b0")
    # a reshape of a tensor has the same SQNR: name the first of equal values only
    lowest: dict[float, tuple[int, Mapping[str, Any]]] = {}
    for index, row in sorted(finite, key=lambda item: (item[1]["sqnr_db"], item[0])):
        lowest.setdefault(round(row["sqnr_db"], 6), (index, row))
    for rank, (index, row) in enumerate(list(lowest.values())[:3]):
        left = index > len(layers) / 2  # the name on the inner side of its point, inside the axes
        # above the point, one line higher per rank: three lowest points close together keep readable names
        axes.annotate(row["tensor"], (index, row["sqnr_db"]), xytext=(-4 if left else 4, 6 + 11 * rank),
                      textcoords="offset points", ha="right" if left else "left", fontsize=7,
                      arrowprops={"arrowstyle": "-", "color": "#999999", "linewidth": 0.5})  # fmt: skip
    axes.margins(y=0.2)
    if len(layers) <= 40:
        axes.set_xticks(
            range(len(layers)), [_short(row["tensor"]) for row in layers], rotation=60, ha="right", fontsize=7
        )
    axes.set_xlabel("quantized activation, in graph order")
    axes.set_ylabel("SQNR (dB)")
    plot = _svg(
        figure,
        "layers",
        "SQNR of each quantized activation as the integer code holds it (its QuantizeLinear's codes times their "
        "scales) against the float model, on one calibration batch; the three lowest named. Every 6 dB is one bit.",
    )
    worst = min((row["sqnr_db"] for _, row in finite), default=None)
    summary = _note(f"{len(layers)} tensors; lowest SQNR {_number(worst)} dB" if worst is not None else "")
    rows = [
        (row["tensor"], row["op"], row["sqnr_db"] if row["sqnr_db"] is not None else "exact", row["absmax"],
         row["threshold"], row["scale"], row["channels"], row["bits"])
        for row in layers
    ]  # fmt: skip
    headers = ["tensor", "producer", "SQNR dB", "max |x| (batch)", "threshold", "scale (max)", "scales", "bits"]
    return _section("layers", heading, summary, plot, _table(headers, rows))


def _ranges_section(tensors: Sequence[QuantizedTensor] | str | None, layers: Sequence[Mapping[str, Any]] | None) -> str:
    heading = "Ranges and scales"
    if tensors is None or isinstance(tensors, str):
        return _section("ranges", heading, _note(tensors or "no QDQ model (qdq.onnx) to read the scales from"))
    observed = {row["tensor"]: row for row in layers or []}
    activations = [t for t in tensors if t.kind == "activation"]
    weights = [t for t in tensors if t.kind == "weight" and not t.dtype.startswith(("int32", "uint32"))]
    figure = _figure(11, 6.5)
    act_axes, weight_axes = figure.subplots(2, 1)
    positions = np.arange(len(activations))
    act_axes.bar(positions, [t.high for t in activations], color="#c8d6ec", label="representable max (qmax·scale)")
    for key, marker, label in (("absmax", "o", "max |x| on the batch"), ("threshold", "x", "calibration threshold")):
        points = [(i, observed[t.name][key]) for i, t in enumerate(activations) if observed.get(t.name, {}).get(key)]
        if points:
            act_axes.plot(*zip(*points, strict=True), marker, linestyle="none", markersize=4, label=label)
    act_axes.set_yscale("log")
    act_axes.set_title("activations, in graph order")
    act_axes.legend(loc="upper right", fontsize=7)
    positions = np.arange(len(weights))
    act_axes.set_xlim(-1, max(len(activations), 1))
    weight_axes.vlines(positions, [t.scale_min for t in weights], [t.scale_max for t in weights], color="#8172b3")
    weight_axes.plot(positions, [t.scale_max for t in weights], "_", color="#8172b3", markersize=8)
    weight_axes.set_yscale("log")
    weight_axes.set_title("weight scales (the line spans the per-channel scales; one mark: per tensor)")
    weight_axes.set_xlim(-1, max(len(weights), 1))
    for axes, items in ((act_axes, activations), (weight_axes, weights)):
        if len(items) <= 40:
            axes.set_xticks(range(len(items)), [_short(t.name) for t in items], rotation=60, ha="right", fontsize=6)
    plot = _svg(figure, "ranges", "Scales the quantizer chose, and the float ranges they cover.")
    act_rows = [
        (t.name, t.reader, t.dtype, t.scale_min, t.scale_max, t.channels, t.low, t.high,
         observed.get(t.name, {}).get("threshold"), observed.get(t.name, {}).get("absmax"))
        for t in activations
    ]  # fmt: skip
    act_headers = ["activation", "read by", "codes", "scale min", "scale max", "scales", "low", "high"]
    weight_rows = [
        (t.name, t.reader, t.dtype, "×".join(map(str, t.shape)), t.scale_min, t.scale_max, t.channels, t.low, t.high)
        for t in tensors
        if t.kind == "weight"
    ]
    weight_headers = ["weight", "read by", "codes", "shape", "scale min", "scale max", "scales", "min", "max"]
    return _section(
        "ranges",
        heading,
        plot,
        "<h3>Activations</h3>",
        _table([*act_headers, "threshold", "max |x| (batch)"], act_rows),
        "<h3>Weights and biases</h3>",
        _table(weight_headers, weight_rows),
    )


def _kernels_section(kernels: Sequence[Mapping[str, Any]] | None) -> str:
    heading = "Time per kernel"
    if kernels is None:
        return _section("kernels", heading, _note("not profiled (qcompiler report --no-profile)"))
    if not kernels:
        return _section("kernels", heading, _note("the profiler timed no kernel"))
    top = list(kernels[:TOP_KERNELS])
    figure = _figure(11, 1.0 + 0.24 * len(top))
    axes = figure.subplots()
    axes.barh(range(len(top)), [row["ms"] for row in top], color="#c44e52")
    axes.set_yticks(range(len(top)), [f"{_short(row['kernel'])} ×{row['calls']}" for row in top], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("ms per run (median)")
    plot = _svg(figure, "kernels", f"The {len(top)} slowest kernels of one run (zero inputs), calls per run.")
    total = _note(f"{len(kernels)} kernels, {sum(row['ms'] for row in kernels):.3f} ms per run in all")
    rows = [(row["kernel"], row["calls"], row["ms"], f"{row['share']:.1%}") for row in kernels]
    return _section("kernels", heading, total, plot, _table(["kernel", "calls", "ms", "share"], rows))


def _llm_section(llm: Any) -> str:
    if not llm:
        return ""
    rows = [{"model": name, **values} for name, values in llm.items()] if isinstance(llm, Mapping) else list(llm)
    headers = list(dict.fromkeys(key for row in rows for key in row))
    table = _table(headers, [[row.get(key) for key in headers] for row in rows])
    return _section("llm", "Perplexity and latency", table)
