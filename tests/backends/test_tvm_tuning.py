"""The GEMM tile search: candidates fit the register file and the shape, every tile is bit-exact, the cache is
written, reused and keyed by target, and a build without ``tune`` never reads it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qcompiler.backends.tvm import build, int8_dot_isa, resolve_target, tuning
from qcompiler.testing import assert_bit_exact
from qcompiler.testing.kernel_models import single_node_model

pytestmark = pytest.mark.tvm


def _qgemm(m: int, n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    inits = {
        "w": rng.integers(-128, 128, (n, k)).astype(np.int8),
        "b": rng.integers(-5000, 5000, n).astype(np.int32),
        "m": rng.integers(1 << 30, 1 << 31, n).astype(np.int32),
        "s": rng.integers(36, 44, n).astype(np.int32),
    }
    model = single_node_model("QGemm", ["w", "b", "m", "s"], (m, k), inits)
    feeds = [{"x": rng.integers(-128, 128, (m, k)).astype(np.int8)}, {"x": np.full((m, k), -128, np.int8)}]
    return model, feeds


@pytest.mark.parametrize("isa", ["avx512vnni", "avx2"])
def test_candidates_fit_the_registers_and_divide_the_rows(isa: str) -> None:
    lanes = 16 if isa == "avx512vnni" else 8
    for m, n in [(1, 4096), (12, 40), (128, 576), (7, 9)]:
        tiles = tuning.candidates(isa, m, n, lanes)
        assert tiles
        for tile in tiles:
            assert m % tile.mr == 0 and tile.mr * tile.nr <= tuning.REGISTER_BUDGET[isa]
            assert tile.nr <= -(-n // lanes)


@pytest.mark.parametrize(("m", "n", "k"), [(8, 40, 130), (6, 200, 64)])
def test_every_candidate_tile_is_bit_exact(tmp_path, m: int, n: int, k: int) -> None:
    """Each tile a search may pick, forced through the cache, against the reference."""
    target, _ = resolve_target("llvm")
    isa = int8_dot_isa(target)
    lanes = 16 if isa == "avx512vnni" else 8
    model, feeds = _qgemm(m, n, k, seed=m + n)
    for tile in tuning.candidates(isa, m, n, lanes):
        cache = tuning.TileCache(tmp_path / f"{tile.mr}x{tile.nr}")
        cache.put(tuning.gemm_key(target, isa, m, n, k, 4), tile, 1e-6)
        builder = lambda proto, cache=cache: build(proto, {"x": [m, k]}, tune=True, tile_cache=cache)  # noqa: E731
        assert_bit_exact(builder, model, feeds)


def test_tuning_writes_the_cache_and_a_second_build_reuses_it(tmp_path, monkeypatch) -> None:
    model, feeds = _qgemm(4, 48, 64)
    cache = tuning.TileCache(tmp_path)
    assert_bit_exact(lambda proto: build(proto, {"x": [4, 64]}, tune=True, tile_cache=cache), model, feeds)
    entries = json.loads((tmp_path / tuning.CACHE_FILE).read_text())
    assert len(entries) == 1
    ((key, entry),) = entries.items()
    assert "|4x48x64|kb4" in key and entry["us"] > 0 and {"mr", "nr"} <= entry.keys()

    def no_search(*args, **kwargs):
        raise AssertionError("the cached shape was searched again")

    monkeypatch.setattr(tuning, "tune_gemm", no_search)
    reloaded = tuning.TileCache(tmp_path)
    assert len(reloaded) == 1
    assert_bit_exact(lambda proto: build(proto, {"x": [4, 64]}, tune=True, tile_cache=reloaded), model, feeds)
    build(model, {"x": [4, 64]})  # no tune: no cache, no search


def test_tuning_keeps_the_default_unless_another_tile_is_clearly_faster(monkeypatch) -> None:
    """Noise is not a speedup: a candidate within the 5 % margin of the default loses to it."""
    target, _ = resolve_target("llvm")
    isa = int8_dot_isa(target)
    default = tuning.default_tile(isa, 16, 64)
    times = {default: 1.0}

    class Timer:
        def __init__(self, seconds: float) -> None:
            self.seconds = seconds

        def __call__(self, *arrays):
            return type("Result", (), {"results": [self.seconds]})()

    def fake_kernel(m, n, k, tile, target, isa, remote):
        return Timer(times.get(tile, 0.97)), []

    monkeypatch.setattr(tuning, "_gemm_kernel", fake_kernel)
    assert tuning.tune_gemm(16, 64, 128, target, isa)[0] == default
    times.update({t: 0.9 for t in tuning.candidates(isa, 16, 64, 16 if isa == "avx512vnni" else 8) if t != default})
    assert tuning.tune_gemm(16, 64, 128, target, isa)[0] != default


def test_cache_keys_name_the_target_and_an_unreadable_cache_is_ignored(tmp_path) -> None:
    import tvm

    haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    icelake = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})
    assert tuning.gemm_key(haswell, "avx2", 1, 2, 3, 4) != tuning.gemm_key(icelake, "avx2", 1, 2, 3, 4)
    (tmp_path / tuning.CACHE_FILE).write_text("{not json")
    assert len(tuning.TileCache(tmp_path)) == 0
