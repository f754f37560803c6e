"""Issue 20, acceptance 4: every output is written all or nothing. A process killed by SIGKILL while it writes
(first write, or replacing an earlier output) leaves no half-written output under the target's name; the next
write sweeps its leftovers, puts back a directory it had parked, and completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import qcompiler
from qcompiler import files
from qcompiler.files import LIBRARY_FILE
from qcompiler.testing.data import mnist_model_path, mnist_test_vector

pytestmark = pytest.mark.tvm

#: the child prints this at the point it is told to stop, then waits to be killed
PAUSED = "paused"


@pytest.fixture(scope="module")
def saved_mnist(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    calibration = [rng.random((1, 1, 28, 28), dtype=np.float32) * 255 for _ in range(4)]
    compiled = qcompiler.compile(str(mnist_model_path()), calibration=calibration, progress=False)
    return compiled.save(tmp_path_factory.mktemp("saved") / "mnist")


def _kill_while(body: str, cwd: Path) -> None:
    """Run ``body`` in a child Python that prints PAUSED and sleeps at the point under test; SIGKILL it there."""
    script = textwrap.dedent(f"""
        import os, sys, time
        def pause(*args, **kwargs):
            print({PAUSED!r}, flush=True)
            time.sleep(600)
    """) + textwrap.dedent(body)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == PAUSED, f"the child ended before the point under test: {line!r}"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_save_killed_mid_way_leaves_no_output_and_a_rerun_completes(saved_mnist, tmp_path) -> None:
    target = tmp_path / "out"
    _kill_while(
        f"""
        import onnx, qcompiler
        model = qcompiler.load({str(saved_mnist)!r})
        written = onnx.save
        def save_then_pause(proto, path, *args, **kwargs):
            written(proto, path, *args, **kwargs)
            pause()
        onnx.save = save_then_pause
        model.save({str(target)!r})
        """,
        tmp_path,
    )
    assert not target.exists(), "a killed save left a half-written output directory"
    assert any(name.startswith(".out.staging-") for name in _names(tmp_path)), "the kill was not mid-save"
    reloaded = qcompiler.load(saved_mnist)
    reloaded.save(target)
    assert _names(tmp_path) == ["out"], "the rerun did not sweep the killed writer's staging directory"
    x, _ = mnist_test_vector()
    np.testing.assert_array_equal(qcompiler.load(target)(x), reloaded(x))


def test_an_overwrite_killed_between_its_renames_keeps_the_old_output(saved_mnist, tmp_path) -> None:
    target = tmp_path / "out"
    qcompiler.load(saved_mnist).save(target)
    before = (target / LIBRARY_FILE).read_bytes()
    _kill_while(
        f"""
        import os, qcompiler
        model = qcompiler.load({str(saved_mnist)!r})
        renamed = os.replace
        def rename_then_pause(source, destination):
            renamed(source, destination)
            if ".old-" in str(destination):
                pause()
        os.replace = rename_then_pause
        model.save({str(target)!r}, overwrite=True)
        """,
        tmp_path,
    )
    assert not target.exists() and any(".out.old-" in name for name in _names(tmp_path))
    files.recover(target)
    assert _names(tmp_path) == ["out"]
    assert (target / LIBRARY_FILE).read_bytes() == before, "the parked output did not come back whole"


def test_a_cli_compile_killed_mid_way_writes_nothing_and_a_rerun_completes(tmp_path) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calibration.npz", Input3=rng.random((4, 1, 1, 28, 28), dtype=np.float32) * 255)
    command = ["compile", str(mnist_model_path()), "--calibration", "calibration.npz", "-o", "out", "-q"]
    _kill_while(
        f"""
        import onnx
        from qcompiler import cli
        written = onnx.save
        def save_then_pause(proto, path, *args, **kwargs):
            written(proto, path, *args, **kwargs)
            pause()
        onnx.save = save_then_pause
        sys.exit(cli.main({command!r}))
        """,
        tmp_path,
    )
    assert not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, "-m", "qcompiler", *command], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _names(tmp_path) == ["calibration.npz", "out"]
    assert (tmp_path / "out" / LIBRARY_FILE).is_file()


def test_a_live_writers_staging_is_left_alone(tmp_path) -> None:
    """Leftovers are swept only for dead processes: a concurrent writer's staging entry survives another write."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        staging = tmp_path / f".report.html.staging-{live.pid}-x"
        staging.write_text("being written")
        files.write_text(tmp_path / "report.html", "<html></html>")
        assert staging.exists()
    finally:
        live.kill()
        live.wait(timeout=30)
    files.write_text(tmp_path / "report.html", "<html>2</html>")
    assert _names(tmp_path) == ["report.html"]
    assert (tmp_path / "report.html").read_text() == "<html>2</html>"
