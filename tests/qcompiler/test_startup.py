"""Start-up cost: ``import qcompiler``, the CLI and loading a compiled model pay only for what they use.

Each check runs in a fresh interpreter (the test process has long imported everything) and asserts which heavy
modules got imported, not how long it took (timings are for benchmarks on these noisy machines): TVM and torch
only on the first build or load, the AVX2 intrinsics' TVMScript (about 2 s to parse) only on the first build.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qcompiler.testing.data import digits_28x28, mnist_model_path, mnist_test_vector

HEAVY = ("tvm", "torch")
INTRINSICS = "qcompiler.backends.tvm.intrinsics"


def _loaded_after(code: str) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; which of HEAVY and the intrinsics module it imported."""
    watched = (*HEAVY, INTRINSICS)
    script = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {watched!r}}}))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_neither_tvm_nor_torch() -> None:
    loaded = _loaded_after("import qcompiler")
    assert not any(loaded.values()), f"import qcompiler imported {[m for m, on in loaded.items() if on]}"


def test_cli_help_and_recipes_load_neither_tvm_nor_torch() -> None:
    code = (
        "import runpy, sys\n"
        "for argv in (['recipes'], ['--help'], ['compile', '--help']):\n"
        "    sys.argv = ['qcompiler', *argv]\n"
        "    try:\n"
        "        runpy.run_module('qcompiler', run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), exit.code\n"
    )
    loaded = _loaded_after(code)
    assert not any(loaded.values()), f"the CLI imported {[m for m, on in loaded.items() if on]}"


def test_python_dash_m_is_the_qcompiler_command() -> None:
    run = [sys.executable, "-m", "qcompiler"]
    listed = subprocess.run([*run, "recipes"], capture_output=True, text=True, check=True, timeout=120).stdout
    assert "w8a8" in listed.split() and "auto" in listed.split()
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True, timeout=120).stdout
    assert helped.startswith("usage: qcompiler ") and "compile" in helped
    bad = subprocess.run([*run, "frobnicate"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'frobnicate'" in bad.stderr


@pytest.mark.tvm
def test_loading_a_compiled_model_skips_the_build_machinery(tmp_path: Path) -> None:
    import qcompiler

    images, _ = digits_28x28()
    compiled = qcompiler.compile(
        str(mnist_model_path()), calibration={"Input3": images[:64].reshape(64, 1, 1, 28, 28)}, progress=False
    )
    compiled.save(tmp_path / "mnist")
    x, _ = mnist_test_vector()
    np.save(tmp_path / "x.npy", x)
    code = (
        "import numpy as np, qcompiler\n"
        f"model = qcompiler.load({str(tmp_path / 'mnist')!r})\n"
        f"assert model(np.load({str(tmp_path / 'x.npy')!r})).shape == (1, 10)\n"
    )
    loaded = _loaded_after(code)
    assert loaded["tvm"], "the load ran without TVM: the check is not checking"
    assert not loaded[INTRINSICS], "loading a compiled model parsed the build's tensor intrinsics"
