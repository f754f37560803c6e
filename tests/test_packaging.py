"""The wheel carries every module of the three packages under the qcompiler namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("qcompiler-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, prefix in (
        ("qcompiler", "qcompiler"),
        ("passes", "qcompiler/passes"),
        ("backends", "qcompiler/backends"),
    ):
        for path in (ROOT / folder).rglob("*.py"):
            expected.add(f"{prefix}/{path.relative_to(ROOT / folder).as_posix()}")
    expected.add("qcompiler/recipes/w8a8.toml")
    missing = sorted(expected - names)
    assert not missing, f"missing from the wheel: {missing}"
