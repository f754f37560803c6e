"""The command line: compile MNIST from an .npz, the summary table, and errors with a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcompiler.cli import main
from qcompiler.testing.data import digits_28x28, mnist_model_path, mnist_test_vector

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    images, _ = digits_28x28()
    path = tmp_path_factory.mktemp("cal") / "digits.npz"
    np.savez(path, Input3=images[:128:4].reshape(32, 1, 1, 28, 28))
    return path


def test_compile_writes_a_loadable_model(calibration_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mnist"
    code = main(["compile", str(mnist_model_path()), "--calibration", str(calibration_file), "-o", str(out), "-q"])
    assert code == 0
    text = capsys.readouterr().out
    assert "FuseIntegerLinearPass" in text and "qcompiler::QConv" in text and "compiled in" in text
    report = json.loads((out / "report.json").read_text())
    assert report["float_ops_inside"] == 0
    import qcompiler

    x, expected = mnist_test_vector()
    assert int(np.argmax(qcompiler.load(out)(x))) == int(np.argmax(expected))


def test_errors_exit_non_zero_with_a_message(calibration_file: Path, tmp_path: Path, capsys) -> None:
    model = str(mnist_model_path())
    assert (
        main(
            [
                "compile",
                model,
                "--calibration",
                str(calibration_file),
                "-o",
                str(tmp_path / "a"),
                "--recipe",
                "w9",
            ]
        )
        == 1
    )
    assert "unknown recipe 'w9'" in capsys.readouterr().err
    assert main(["compile", model, "--calibration", str(tmp_path / "none.npz"), "-o", str(tmp_path / "b")]) == 2
    assert "--calibration" in capsys.readouterr().err
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, Input3=np.zeros((4, 28, 28), np.float32))
    assert main(["compile", model, "--calibration", str(wrong), "-o", str(tmp_path / "c")]) == 1
    assert "Input3" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_recipes_command(capsys) -> None:
    assert main(["recipes"]) == 0
    assert "w8a8" in capsys.readouterr().out.split()
