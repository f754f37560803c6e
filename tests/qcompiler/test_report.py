"""The HTML report (qcompiler/report.py, ``qcompiler report``) and the per-layer error measured at compile time
(qcompiler/ir/analysis/layer_error.py): on the real MNIST CNN, the page holds every section and its inline SVG
plots and fetches nothing; the SQNR of an 8-bit model is finite and high; a failed measurement leaves the compile
alone; the CLI names a directory that is not a compiled model. The slow test renders the page in headless
Chromium (Debian's ``chromium``; .ci/run installs it)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.cli import main
from qcompiler.ir.analysis import layer_error
from qcompiler.ir.analysis.layer_error import dequantize, sqnr_db
from qcompiler.report import quantized_tensors, render_html
from qcompiler.testing.data import digits_28x28, mnist_model_path

pytestmark = pytest.mark.tvm

#: the page's sections, by id (``llm`` only when the report has such rows)
SECTIONS = ("summary", "passes", "ops", "layers", "ranges", "kernels")
#: plots of a profiled page with per-layer errors: passes, ops, layers, ranges, kernels
PLOTS = 5


@pytest.fixture(scope="module")
def calibration() -> list[np.ndarray]:
    images, _ = digits_28x28()
    return [images[i : i + 1] for i in range(1, len(images), 40)]


@pytest.fixture(scope="module")
def compiled(calibration) -> qcompiler.CompiledModel:
    return qcompiler.compile(str(mnist_model_path()), calibration=calibration, recipe="w8a8", progress=False)


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory) -> Path:
    return compiled.save(tmp_path_factory.mktemp("report") / "mnist")


@pytest.fixture(scope="module")
def page(compiled, tmp_path_factory) -> Path:
    return compiled.report_html(tmp_path_factory.mktemp("page") / "mnist.html", repeat=1)


def test_page_has_every_section_with_an_inline_svg_plot(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    for section in SECTIONS:
        assert f'<section id="{section}">' in text, section
    assert text.count("<svg") == text.count("</svg>") == text.count("<figure") == PLOTS
    for plot in ("passes", "ops", "layers", "ranges", "kernels"):
        assert re.search(rf'<figure id="plot-{plot}">\s*<svg ', text), plot
    assert "QuantizeQDQPass" in text and "qcompiler::QConv" in text  # a pass and an op, in the tables
    assert "Parameter5_quantized" in text  # a weight of the ranges table
    assert 'id="llm"' not in text  # no language-model rows in this report


def test_page_fetches_nothing(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert re.search(r"https?://", text) is None  # not even the SVG namespace URLs (the HTML parser needs none)
    assert re.search(r"<(link|img|iframe|object|embed)\b", text) is None
    assert re.search(r"\bsrc\s*=|url\((?!#)|@import", text) is None  # url(#clip): a clip path of the same SVG
    assert "<?xml" not in text and "<!DOCTYPE svg" not in text


def test_ids_of_the_plots_never_collide_and_every_reference_resolves(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    ids = re.findall(r'\sid="([^"]+)"', text)
    assert len(ids) == len(set(ids))
    references = set(re.findall(r"url\(#([^)]+)\)", text)) | set(re.findall(r'href="#([^"]+)"', text))
    assert references and references <= set(ids)


def test_sqnr_per_layer_is_finite_and_high_for_an_8_bit_cnn(compiled) -> None:
    layers = compiled.report["layers"]
    activations = [t for t in quantized_tensors(compiled.qdq_model) if t.kind == "activation"]
    assert [row["tensor"] for row in layers][:2] == ["Input3", "ReLU32_Output_0"]  # the float graph's order
    # every quantized activation but the flattening Reshape's output (its input's values: its input's error)
    assert {t.name for t in activations} - {row["tensor"] for row in layers} == {"Pooling160_Output_0_reshape0"}
    assert len(layers) == len(activations) - 1
    for row in layers:
        assert row["sqnr_db"] is not None and np.isfinite(row["sqnr_db"]), row
        assert 25.0 < row["sqnr_db"] < 60.0, row  # 8 bits: ~6 dB a bit, less what clipping and depth cost
        assert row["bits"] in (8, 16) and row["scale"] > 0 and row["absmax"] > 0
        assert row["threshold"] is not None and row["threshold"] >= row["absmax"] * 0.999  # minmax observer
    first = layers[0]  # the input alone: rounding at a step s gives noise s^2 / 12 per element
    assert first["op"] == "input" and first["sqnr_db"] > 45.0


def test_sqnr_is_the_numpy_definition_on_the_first_calibration_batch(compiled, calibration) -> None:
    """The measurement reduces in onnxruntime, beside both graphs; here the same number from the arrays."""
    name, feeds = "ReLU114_Output_0", {"Input3": calibration[0]}
    float_model = onnx.load(str(mnist_model_path()))  # its canonical form keeps this tensor's name and values
    float_model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    (reference,) = _run(float_model, [name], feeds)
    qdq = onnx.ModelProto()
    qdq.CopyFrom(compiled.qdq_model)
    qdq.graph.output.append(helper.make_tensor_value_info(f"{name}_q", TensorProto.INT8, None))
    (codes,) = _run(qdq, [f"{name}_q"], feeds)
    scale = next(t for t in quantized_tensors(compiled.qdq_model) if t.name == name).scale_max
    row = next(row for row in compiled.report["layers"] if row["tensor"] == name)
    assert row["sqnr_db"] == pytest.approx(sqnr_db(reference, codes * np.float32(scale)), abs=1e-3)
    assert row["absmax"] == pytest.approx(float(np.abs(reference).max()), rel=1e-6)


def _run(model: onnx.ModelProto, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def test_layers_survive_save_and_load_as_json(compiled, saved: Path) -> None:
    report = json.loads((saved / "report.json").read_text())
    assert report["layers"] == json.loads(json.dumps(compiled.report["layers"]))


def test_ranges_are_what_the_codes_and_scales_represent(compiled) -> None:
    tensors = {t.name: t for t in quantized_tensors(compiled.qdq_model)}
    activation = tensors["ReLU32_Output_0"]
    assert activation.kind == "activation" and activation.dtype == "int8" and activation.reader == "MaxPool"
    assert activation.high == pytest.approx(127 * activation.scale_max) and activation.low < 0
    weight = tensors["Parameter5_quantized"]
    initializers = {t.name: numpy_helper.to_array(t) for t in compiled.qdq_model.graph.initializer}
    codes, scales = initializers["Parameter5_quantized"], initializers["Parameter5_scale"]
    values = codes.astype(np.float64) * scales.reshape(-1, 1, 1, 1)
    assert weight.kind == "weight" and weight.reader == "Conv" and weight.channels == scales.size == 8
    assert (weight.low, weight.high) == pytest.approx((values.min(), values.max()))


def test_a_failed_measurement_leaves_the_compile_and_the_report_alone(monkeypatch, caplog) -> None:
    def broken(self, model, weights, thresholds):
        raise RuntimeError("no runtime today")

    monkeypatch.setattr(layer_error.LayerErrorProbe, "_measure", broken)
    images, _ = digits_28x28()
    with caplog.at_level(logging.DEBUG, logger="qcompiler.ir.analysis.layer_error"):
        compiled = qcompiler.compile(str(mnist_model_path()), calibration=[images[:1]], recipe="w8a8", progress=False)
    assert "layers" not in compiled.report
    assert "per-layer error not measured: RuntimeError: no runtime today" in caplog.text
    assert 'id="layers"' in render_html(compiled.report) and "not measured" in render_html(compiled.report)


def test_a_stream_of_calibration_batches_is_not_read_twice() -> None:
    assert layer_error.LayerErrorProbe.capture(None, iter([])) is None  # type: ignore[arg-type]


def test_sqnr_db() -> None:
    x = np.ones(100, np.float32)
    assert sqnr_db(x, x + 0.1) == pytest.approx(20.0, abs=1e-4)  # 100 / (100 * 0.01)
    assert sqnr_db(x, x) is None and sqnr_db(np.zeros(4), np.ones(4)) is None


def test_dequantize_per_tensor_per_axis_and_blocked() -> None:
    codes = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    assert dequantize(codes, np.array(0.5), None, 0, 0) == pytest.approx(codes * 0.5)
    per_row = np.array([1.0, 2.0, 3.0])
    assert dequantize(codes, per_row, np.array([0, 1, 0], np.int8), 0, 0) == pytest.approx(
        (codes - np.array([[0], [1], [0]])) * per_row[:, None]
    )
    blocks = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # blocks of 2 along axis 1
    assert dequantize(codes, blocks, None, 1, 2) == pytest.approx(codes * np.repeat(blocks, 2, axis=1))


def _per_channel_qdq(axis: int) -> onnx.ModelProto:
    scale = np.array([0.05, 0.1, 0.2], np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], axis=axis),
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"], axis=axis),
        helper.make_node("Relu", ["x_dq"], ["y"]),
    ]
    shape = [2, 3, 4, 5] if axis == 1 else [2, 4, 5, 3]
    graph = helper.make_graph(
        nodes,
        "per_channel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.zeros(3, np.int8), "z")],
        value_info=[helper.make_tensor_value_info("x_dq", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("axis", [1, -1])
def test_per_tensor_form_gives_the_same_codes_and_values(axis: int) -> None:
    """The measurement's rewrite of per-channel Q/DQ: Div + QuantizeLinear at scale 1, DequantizeLinear at 1 + Mul."""
    model = _per_channel_qdq(axis)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = {"x": np.random.default_rng(0).normal(0, 8, shape).astype(np.float32)}
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    layer_error._per_tensor_form(rewritten, layer_error._ranks(rewritten))
    assert [n.op_type for n in rewritten.graph.node] == ["Div", "QuantizeLinear", "DequantizeLinear", "Mul", "Relu"]
    for model_ in (model, rewritten):
        model_.graph.output.append(helper.make_tensor_value_info("x_q", TensorProto.INT8, shape))
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    (y0, q0), (y1, q1) = before.run(None, x), after.run(None, x)
    np.testing.assert_array_equal(q0, q1)
    np.testing.assert_allclose(y0, y1, rtol=1e-6, atol=0)  # (q * 1) * s against q * s: equal up to float rounding


def test_llm_rows_are_a_table_when_present() -> None:
    report = {"recipe": "w8a8-llm", "passes": [], "ops": {}}
    assert 'id="llm"' not in render_html(report)
    rows = [{"model": "float", "perplexity": 27.61}, {"model": "int8", "perplexity": 28.5, "ms_per_token": 9.25}]
    text = render_html({**report, "llm": rows})
    assert '<section id="llm">' in text and "27.6" in text and "9.25" in text and "ms_per_token" in text
    assert "not profiled" in text and "no QDQ model" in text  # each empty section says why


def test_a_qdq_model_it_cannot_read_costs_only_its_section() -> None:
    odd = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"])],
        "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("x_q", TensorProto.FLOAT, [2])],
        [
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.array(0.0, np.float32), "z"),
        ],
    )
    text = render_html({"passes": [], "ops": {"QuantizeLinear": 1}}, helper.make_model(odd))
    assert "could not read the scales of the QDQ model: ValueError" in text and '<figure id="plot-ops">' in text


def test_cli_report_without_profile_needs_no_model_run(saved: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "page.html"
    assert main(["report", str(saved), "--no-profile", "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    assert text.count("<svg") == PLOTS - 1 and "not profiled" in text and "<title>qcompiler report: mnist<" in text


def test_cli_report_profiles_and_writes_next_to_the_model(saved: Path, tmp_path: Path) -> None:
    directory = tmp_path / "copy"
    shutil.copytree(saved, directory)
    assert main(["report", str(directory), "--repeat", "1"]) == 0
    text = (directory / "report.html").read_text(encoding="utf-8")
    assert text.count("<svg") == PLOTS and '<figure id="plot-kernels">' in text


def test_cli_report_names_a_directory_that_is_not_a_compiled_model(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: directory: {tmp_path} is not a compiled model (no report.json)" in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    (tmp_path / "report.json").write_text("{not json")
    assert main(["report", str(tmp_path), "--no-profile"]) == 2
    assert f"{tmp_path / 'report.json'} is not a compiled model's report" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def _chromium(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(chromium).is_file(), "no chromium: apt-get install -y chromium (.ci/run installs it as root)"
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.slow
def test_page_renders_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    """The browser draws every plot at a size (the page's script counts them into a body attribute) and its
    console stays silent: no script error, nothing refused to load."""
    dom = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None and f'data-plots-rendered="{PLOTS}"' in body.group(0), body
    assert len(re.findall(r"<svg\b", dom.stdout)) == PLOTS

    screenshot = tmp_path / "page.png"
    shot = _chromium(page, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000")
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50  # drawn plots and text, not a blank page
