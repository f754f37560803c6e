"""Quiet by default: a compile prints nothing a user cannot act on; the libraries' messages go to our logging.

The end-to-end checks run in a fresh interpreter, as a user's script would (pytest installs log handlers and
captures warnings of its own, which would hide what a user sees): with ``progress=False`` a compile of an ONNX
model and of a ``torch.nn.Module`` writes nothing at all to stdout or stderr (checked at the file descriptors).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
import warnings

import pytest

from qcompiler.logs import ROUTED, third_party_routed

pytestmark = pytest.mark.tvm


def _output_of(script: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_compile_run_save_and_load_of_an_onnx_model_print_nothing() -> None:
    printed = _output_of(
        """
        import qcompiler
        from qcompiler.testing.data import digits_28x28, mnist_model_path

        import tempfile
        from qcompiler.testing.data import mnist_test_vector

        images, _ = digits_28x28()
        compiled = qcompiler.compile(str(mnist_model_path()),
                                     calibration={"Input3": images[:32].reshape(32, 1, 1, 28, 28)}, progress=False)
        x, _ = mnist_test_vector()
        compiled(x)  # a run before saving: TVM's runtime then logs every memory scope it saves and loads
        with tempfile.TemporaryDirectory() as folder:
            compiled.save(folder + "/mnist")
            qcompiler.load(folder + "/mnist")(x)
        """
    )
    assert printed == "", printed[-3000:]


def test_compile_of_a_torch_module_prints_nothing() -> None:
    printed = _output_of(
        """
        import torch
        import qcompiler

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
        x = torch.randn(4, 16)
        qcompiler.compile(net, example_inputs=(x,), calibration=[{"input": x.numpy()}], progress=False)
        """
    )
    assert printed == "", printed[-3000:]


def test_routed_messages_reach_our_logger_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=ROUTED.name)
    handlers = list(logging.getLogger("onnxscript").handlers)
    with third_party_routed():
        logging.getLogger("onnxscript.optimizer").warning("Evaluation failed: %s", "a library's complaint")
        warnings.warn("a library's deprecation", FutureWarning, stacklevel=1)
    routed = [r.getMessage() for r in caplog.records if r.name == ROUTED.name]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == ROUTED.name)
    assert any("Evaluation failed: a library's complaint" in m for m in routed), routed
    assert any("FutureWarning: a library's deprecation" in m for m in routed), routed
    # outside the block the library's logger is its own again
    assert logging.getLogger("onnxscript.optimizer").propagate
    assert logging.getLogger("onnxscript").handlers == handlers


def test_nothing_is_captured_when_the_user_asks_for_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="qcompiler")
    with third_party_routed():
        logging.getLogger("onnxscript.optimizer").warning("seen where it was written")
    assert [r.name for r in caplog.records] == ["onnxscript.optimizer"]


def test_cli_is_quiet_and_verbose_shows_the_libraries(tmp_path) -> None:
    import numpy as np

    from qcompiler.testing.data import digits_28x28, mnist_model_path

    images, _ = digits_28x28()
    np.savez(tmp_path / "cal.npz", Input3=images[:32].reshape(32, 1, 1, 28, 28))
    command = [sys.executable, "-m", "qcompiler"]
    args = ["compile", str(mnist_model_path()), "--calibration", str(tmp_path / "cal.npz"), "-q", "--overwrite"]
    quiet = subprocess.run([*command, *args, "-o", str(tmp_path / "a")], capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-3000:]
    assert "compiled in" in quiet.stdout  # the summary is ours and stays
    verbose = subprocess.run(
        [*command, "--verbose", *args, "-o", str(tmp_path / "b")], capture_output=True, text=True, timeout=600
    )
    assert verbose.returncode == 0
    assert "onnxscript.version_converter" in verbose.stderr and "qcompiler.pipeline" in verbose.stderr


def test_onnxruntime_sessions_log_errors_only_unless_debugging(caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime writes its warnings natively ("Removing initializer ... not used by any node" on PaddleOCR's
    models mid-pipeline): our sessions ask it for errors only, and for its warnings too under ``--verbose``."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from qcompiler.ir.ort_session import onnxruntime_session

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert onnxruntime_session(model).get_session_options().log_severity_level == 3
    caplog.set_level(logging.DEBUG, logger="qcompiler")
    assert onnxruntime_session(model).get_session_options().log_severity_level == 2


def test_progress_names_every_step_a_user_waits_for() -> None:
    """With progress on (the default), one line per step: export, canonicalize, calibration, quantization, the
    per-layer error, lowering and each stage of the TVM build; nothing else (the same compile with progress=False
    prints nothing: above)."""
    printed = _output_of(
        """
        import torch
        import qcompiler

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
        x = torch.randn(4, 16)
        qcompiler.compile(net, example_inputs=(x,), calibration=[{"input": x.numpy()}])
        """
    )
    # "label: 00:01" (a step) or "label: 100%|...| 1/1 [...]" (a bar)
    pattern = re.compile(r"^(.*?): +(\d\d:\d\d|\d+%\|.*)$")
    lines = {m.group(1) for m in map(pattern.match, printed.replace("\r", "\n").splitlines()) if m}
    assert all(pattern.match(line) for line in printed.replace("\r", "\n").splitlines() if line.strip()), printed
    expected = {
        "export Sequential (torch.export)",
        "canonicalize",
        "calibrating",
        "quantize (rtn weights, QDQ)",
        "per-layer error against float",
        "lower to integer ops",
        "build: import to TVM Relax",
        "build: schedule kernels",
        "build: generate code (4 functions, LLVM)",
    }
    assert lines == expected, printed[-3000:]
