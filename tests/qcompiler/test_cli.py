"""The command line: compile MNIST from an .npz, the summary table, and errors with a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
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
    assert "recipe auto: kind other" in text and "-> w8a8" in text  # what auto chose, said
    report = json.loads((out / "report.json").read_text())
    assert report["float_ops_inside"] == 0 and report["float_islands"] == []
    assert report["auto"]["kind"] == "other" and report["recipe"] == "w8a8"
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


def test_inspect_prints_regions_and_coverage(tmp_path: Path, capsys) -> None:
    import onnx
    from hypothesis import find

    from qcompiler.testing import transformer_models

    generated = find(
        transformer_models(), lambda g: all(p in g.description for p in ("rms", "pre-norm", "layers=2", "swiglu"))
    )
    path = tmp_path / "block.onnx"
    onnx.save(generated.model, str(path))
    assert main(["inspect", str(path)]) == 0
    blocked = capsys.readouterr().out
    assert "has a gain: run fold-norm-gains first" in blocked
    assert main(["inspect", str(path), "--fold-norms"]) == 0
    text = capsys.readouterr().out
    assert "residual stream #0: hidden" in text and ": rotatable" in text
    coverage = text.split("linears:\n", 1)[1].splitlines()
    assert len(coverage) == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer and the head: every one listed
    assert sum("residual #0 writer" in line for line in coverage) == 4  # o and down projections
    assert sum("head O" in line for line in coverage) == 2
    sites = [line for line in text.splitlines() if line.startswith("online Hadamard (")]
    assert len(sites) == 4 and sum("(mlp)" in line for line in sites) == 2  # down and o projections, per layer
    assert sum("online Hadamard (mlp" in line for line in coverage) == 2
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def compiled_mnist(calibration_file: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compiled") / "mnist"
    assert main(["compile", str(mnist_model_path()), "--calibration", str(calibration_file), "-o", str(out), "-q"]) == 0
    return out


def test_profile_prints_each_kernels_time(compiled_mnist: Path, tmp_path: Path, capsys) -> None:
    """Default zero inputs and an .npz of real ones: a row per kernel (the convolutions among them), slowest
    first, shares of one total; ``--top`` folds the rest into one line."""
    capsys.readouterr()
    assert main(["profile", str(compiled_mnist), "--repeat", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["kernel", "calls", "ms", "share"] and lines[-1].startswith("total ")
    rows = [line.split() for line in lines[1:-1]]
    assert any(row[0].startswith("qconv") for row in rows)
    times = [float(row[2]) for row in rows]
    assert times == sorted(times, reverse=True)
    assert sum(float(row[3].rstrip("%")) for row in rows) == pytest.approx(100, abs=0.1 * len(rows))
    x, _ = mnist_test_vector()
    inputs = tmp_path / "x.npz"
    np.savez(inputs, Input3=x)
    assert main(["profile", str(compiled_mnist), "--inputs", str(inputs), "--top", "2", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[3].startswith("(") and "more)" in lines[3]


def test_profile_errors_name_the_argument(compiled_mnist: Path, tmp_path: Path, capsys) -> None:
    assert main(["profile", str(compiled_mnist), "--repeat", "0"]) == 2
    assert "--repeat: must be at least 1" in capsys.readouterr().err
    assert main(["profile", str(compiled_mnist), "--inputs", str(tmp_path / "none.npz")]) == 2
    assert "--inputs: no such file" in capsys.readouterr().err
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((1, 1, 28, 28), np.float32))
    assert main(["profile", str(compiled_mnist), "--inputs", str(wrong)]) == 2
    assert "has no array for input(s) ['Input3']" in capsys.readouterr().err
    np.savez(wrong, Input3=np.zeros((2, 1, 28, 28), np.float32))
    assert main(["profile", str(compiled_mnist), "--inputs", str(wrong)]) == 2
    assert "--inputs: input 'Input3': shape (2, 1, 28, 28), compiled for (1, 1, 28, 28)" in capsys.readouterr().err
    assert main(["profile", str(tmp_path)]) == 1
    assert "is not a saved qcompiler model" in capsys.readouterr().err


def test_float_islands_flag_keeps_an_unlowerable_op_and_lists_it(tmp_path: Path, capsys) -> None:
    """--float-islands: an Atan between two Gemms compiles (in float between DQ and Q) and the CLI names it."""
    from test_float_islands import _batches, _model  # the same directory, on sys.path under pytest

    model_path, data_path = tmp_path / "atan.onnx", tmp_path / "cal.npz"
    onnx.save(_model(), model_path)
    np.savez(data_path, x=np.stack([b["x"] for b in _batches(4, 0)]))
    args = ["compile", str(model_path), "--calibration", str(data_path), "-q", "--recipe", "w8a8"]
    assert main([*args, "-o", str(tmp_path / "strict")]) == 1
    assert "the_atan" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "islands"), "--float-islands"]) == 0
    assert "float island: the_atan (Atan)" in capsys.readouterr().out
