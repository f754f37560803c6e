"""The fuzz runner (``make fuzz``): it classifies each generated graph, and a broken lowering is a failure."""

from __future__ import annotations

import pytest

from qcompiler.testing import fuzz

#: generated graphs in the quick run (with the other property tests, 200+ in every CI run): a fixed seed, so a
#: failure replays; the slow run (`make fuzz`) draws new graphs every time
QUICK_GRAPHS = 150


def test_a_fuzz_run_is_clean(tmp_path) -> None:
    out = tmp_path / "fuzz.json"
    assert fuzz.main(["--count", str(QUICK_GRAPHS), "--build-every", "30", "--seed", "3", "--out", str(out)]) == 0
    assert f'"count": {QUICK_GRAPHS}' in out.read_text()


def test_a_broken_lowering_is_counted_as_a_mismatch(monkeypatch) -> None:
    """A mutant: every Requantize rounds one level up; the op-by-op check must see it and the run must fail."""
    from qcompiler.dialect import reference

    original = reference.requantize

    def off_by_two(*args, **kwargs):
        return original(*args, **kwargs) + 2

    monkeypatch.setattr(reference, "requantize", off_by_two)
    cases = fuzz.run(6, build_every=0, seed=5)
    assert any(c.outcome == "mismatch" for c in cases)


def test_the_count_must_be_positive(capsys) -> None:
    with pytest.raises(SystemExit):
        fuzz.main(["--count", "0"])
    assert "--count" in capsys.readouterr().err
