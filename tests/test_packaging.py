"""The wheel is the product: it carries every file the package needs, and installed alone in a new venv outside
the checkout, the ``qcompiler`` command, ``python -m qcompiler`` and a compile of the shipped MNIST CNN work.

The wheel is built from a copy of the files git tracks or would track (so nothing stale under ``build/`` and
nothing ignored gets in). The new venv gets the wheel with ``--no-deps`` and sees the dependencies through a
``.pth`` file naming the folders of this interpreter's import path (the checkout left out): a directory named in a
``.pth`` file goes on ``sys.path`` but its own ``.pth`` files are not run, so an editable install of the checkout
there stays inert; the tests check that every ``qcompiler`` module comes from the new venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: checkout folder -> where its files go in the installed package (pyproject.toml's package-dir)
PACKAGE_DIRS = {"qcompiler": "qcompiler", "passes": "qcompiler/passes", "backends": "qcompiler/backends"}
#: what setuptools reads to build the wheel, besides the package folders
BUILD_INPUTS = ("pyproject.toml", "README.md")


def _checkout_files(*paths: str) -> list[str]:
    """The files under ``paths`` that git tracks or would track (untracked, not ignored), as they are now."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the file list comes from git ls-files)")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(name for name in set(listed.split("\0")) if name and (ROOT / name).is_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in _checkout_files(*BUILD_INPUTS, *PACKAGE_DIRS):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    # no isolation: the build backend (setuptools) comes from this environment, so the build works offline
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    # setuptools' complaints about the configuration (byte-compiling is off where PYTHONDONTWRITEBYTECODE is set)
    warnings = [line for line in built.stderr.splitlines() if "warn" in line.lower() and "byte-compiling" not in line]
    assert not warnings, built.stderr[-4000:]
    (path,) = dist.glob("qcompiler-*.whl")
    return path


def test_wheel_contains_every_file_of_the_packages(wheel: Path) -> None:
    """Every module, recipe, test asset and py.typed of the three source folders, at its installed path."""
    expected = set()
    for name in _checkout_files(*PACKAGE_DIRS):
        folder, rest = name.split("/", 1)
        expected.add(f"{PACKAGE_DIRS[folder]}/{rest}")
    assert "qcompiler/recipes/w8a8.toml" in expected and "qcompiler/py.typed" in expected
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "qcompiler = qcompiler.cli:entry" in archive.read(entry_points).decode()
    missing = sorted(expected - names)
    assert not missing, f"missing from the wheel (pyproject.toml's packages or package-data): {missing}"
    shipped = {n for n in names if not n.startswith("qcompiler-")}
    stray = sorted(shipped - expected)
    assert not stray, f"in the wheel but not in the checkout: {stray}"


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv outside the checkout with the wheel installed and this environment's packages visible."""
    home = tmp_path_factory.mktemp("venv") / "env"
    assert not home.is_relative_to(ROOT)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True, timeout=120)
    python = home / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        timeout=300,
        env={**_clean_env(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    probe = "import json, sys, sysconfig; print(json.dumps([sysconfig.get_paths()['purelib'], sys.path]))"
    site, fresh_path = json.loads(
        subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout
    )
    lines = "".join(f"{path}\n" for path in _dependency_paths(fresh_path))
    (Path(site) / "_qcompiler_dependencies.pth").write_text(lines)
    return home


def _dependency_paths(fresh_path: list[str]) -> list[str]:
    """This interpreter's import path less what a new venv has already and less the checkout (its root, its tests,
    a PYTHONPATH to it), site-packages folders kept wherever they are (this venv's may lie inside the checkout)."""
    known = {str(Path(entry).resolve()) for entry in fresh_path if entry}
    kept: dict[str, None] = {}
    for entry in sys.path:
        if not entry or not Path(entry).is_dir():
            continue
        path = Path(entry).resolve()
        if path.is_relative_to(ROOT) and "site-packages" not in path.parts:
            continue
        if str(path) not in known:
            kept[str(path)] = None
    return list(kept)


def _clean_env() -> dict[str, str]:
    """This process's environment without what would put the checkout (or another venv) on the path."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")
    return {key: value for key, value in os.environ.items() if key not in dropped}


def _run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (its first item a program of the venv) from ``cwd``, outside the checkout."""
    assert not cwd.is_relative_to(ROOT)
    result = subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=600, env=_clean_env()
    )
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _module_files(venv: Path, cwd: Path, code: str = "") -> dict[str, str]:
    """After ``code``, the file of every loaded ``qcompiler`` module, in a fresh interpreter of the venv."""
    script = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps({name: getattr(module, '__file__', None) or '' for name, module in sys.modules.items()"
        " if name == 'qcompiler' or name.startswith('qcompiler.')}))"
    )
    return json.loads(_run(venv, "python", "-c", script, cwd=cwd).stdout.strip().splitlines()[-1])


def _assert_inside(files: dict[str, str], venv: Path) -> None:
    outside = {name: file for name, file in files.items() if not Path(file).resolve().is_relative_to(venv.resolve())}
    assert not outside, f"imported from outside the new venv: {outside}"


@pytest.mark.slow  # 14 s on an idle machine, 20-25 s while other work shares the two cores
@pytest.mark.tvm
def test_installed_wheel_runs_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    """``qcompiler --help`` and ``recipes``, ``python -m qcompiler``, and ``qcompiler compile`` of the MNIST CNN
    shipped in the wheel into a directory that loads and runs, every module from the new venv."""
    files = _module_files(venv, tmp_path, "import qcompiler, qcompiler.passes, qcompiler.backends, qcompiler.cli")
    _assert_inside(files, venv)
    assert "qcompiler.passes" in files and "qcompiler.backends" in files

    helped = _run(venv, "qcompiler", "--help", cwd=tmp_path).stdout
    assert helped.startswith("usage: qcompiler ") and "compile" in helped
    listed = _run(venv, "qcompiler", "recipes", cwd=tmp_path).stdout.split()
    assert {"auto", "w8a8", "w8a8-llm", "w4a8"} <= set(listed)
    assert _run(venv, "python", "-m", "qcompiler", "--help", cwd=tmp_path).stdout == helped
    assert _run(venv, "python", "-m", "qcompiler", "recipes", cwd=tmp_path).stdout.split() == listed

    from qcompiler.testing.data import digits_28x28

    images, _ = digits_28x28()
    np.savez(tmp_path / "digits.npz", Input3=images[:128:4].reshape(32, 1, 1, 28, 28))
    locate = "from qcompiler.testing.data import mnist_model_path; print(mnist_model_path())"
    model = Path(_run(venv, "python", "-c", locate, cwd=tmp_path).stdout.strip())
    assert model.is_file() and model.is_relative_to(venv.resolve())  # the asset came with the wheel
    compiled = _run(
        venv, "qcompiler", "compile", str(model), "--calibration", "digits.npz", "-o", "mnist", "-q", cwd=tmp_path
    ).stdout
    assert "qcompiler::QConv" in compiled and "compiled in" in compiled
    report = json.loads((tmp_path / "mnist" / "report.json").read_text())
    assert report["recipe"] == "w8a8" and report["float_ops_inside"] == 0

    code = (
        "import numpy as np, qcompiler\n"
        "from qcompiler.testing.data import mnist_test_vector\n"
        "x, expected = mnist_test_vector()\n"
        "assert int(np.argmax(qcompiler.load('mnist')(x))) == int(np.argmax(expected))\n"
    )
    files = _module_files(venv, tmp_path, code)
    _assert_inside(files, venv)
    assert "qcompiler.backends.tvm" in files  # the backend ran, and came from the wheel too
