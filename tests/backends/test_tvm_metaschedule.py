"""MetaSchedule as a build option: the argument is checked, the GEMM kernels are never handed to it, a failed or
empty search leaves the hand schedules, and a tuned schedule it picks is bit-exact."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from qcompiler.backends.tvm import build, importer, metaschedule, schedules
from qcompiler.dialect import DOMAIN
from qcompiler.testing import assert_bit_exact
from qcompiler.testing.kernel_models import single_node_model

pytestmark = pytest.mark.tvm

_LOGGER = "qcompiler.backends.tvm.metaschedule"


def _requantize_at_ties():
    """Requantize by 1/2 (multiplier 2^30, shift 31): every odd accumulator lands on a .5 tie."""
    x = np.arange(-2048, 2048, dtype=np.int32).reshape(8, 512)
    inits = {"m": np.array(1 << 30, np.int32), "s": np.array(31, np.int32)}
    model = single_node_model("Requantize", ["m", "s"], x.shape, inits, input_dtype=TensorProto.INT32, axis=1)
    return model, [{"x": x}, {"x": x[::-1].copy()}]


def _gemm_then_requantize():
    """QGemm (a hand GEMM kernel) -> Cast to int32 (TVM's own kernel) -> Requantize (our elementwise kernel)."""
    rng = np.random.default_rng(4)
    inits = {
        "w": rng.integers(-127, 128, (64, 32)).astype(np.int8),
        "b": np.zeros(64, np.int32),
        "m": np.full(64, 1 << 30, np.int32),
        "s": np.full(64, 38, np.int32),
        "rm": np.array(1 << 30, np.int32),
        "rs": np.array(30, np.int32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("QGemm", ["x", "w", "b", "m", "s"], ["g"], domain=DOMAIN),
            helper.make_node("Cast", ["g"], ["c"], to=TensorProto.INT32),
            helper.make_node("Requantize", ["c", "rm", "rs"], ["y"], domain=DOMAIN, axis=2),
        ],
        "gemm_requantize",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 8, 32])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])


@pytest.mark.parametrize("trials", [-1, 2.5, True, "8"])
def test_a_bad_trial_count_is_rejected_naming_the_argument(trials) -> None:
    model, _ = _requantize_at_ties()
    with pytest.raises(ValueError, match=r"metaschedule_trials: expected a whole number of trials >= 0"):
        build(model, {"x": [8, 512]}, metaschedule_trials=trials)


def test_the_gemm_kernels_and_reshapes_are_never_candidates() -> None:
    """The import's unscheduled functions: the requantize kernel is a candidate, the GEMM is not, nor the reshape
    of its 3-D input (TVM makes it a view); and a GEMM is refused even if it is offered under its name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mod = importer.import_onnx(_gemm_then_requantize(), {"x": [2, 8, 32]}, isa="avx2")
    mod = relax.transform.LegalizeOps()(mod)  # TVM's ops (the reshapes, the cast) become PrimFuncs
    assert any("reshape" in gv.name_hint for gv in mod.functions)
    tunable = metaschedule.tunable_functions(mod)
    assert "requantize" in tunable
    assert not [name for name in tunable if "qgemm" in name or "reshape" in name]
    gemm = next(gv for gv, f in mod.functions.items() if "qgemm" in gv.name_hint)
    offered = {**tunable, gemm.name_hint: mod[gemm]}
    scheduled = schedules.schedule_module(mod, use_avx2=True)
    names = [c.name for c in metaschedule.candidates(offered, scheduled)]
    assert "requantize" in names and gemm.name_hint not in names
    assert not metaschedule.tunable_functions(scheduled).keys() & {"requantize", gemm.name_hint}  # scheduled now


@pytest.mark.parametrize("search", ["fails", "finds nothing"])
def test_a_failed_or_empty_search_keeps_the_hand_schedules(search: str, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("QCOMPILER_CACHE_DIR", str(tmp_path))

    def fake_tune_tir(*args, **kwargs):
        if search == "fails":
            raise RuntimeError("no design space")

    monkeypatch.setattr(metaschedule.ms, "tune_tir", fake_tune_tir)
    monkeypatch.setattr(metaschedule, "_builder", lambda: "local")  # no build workers to start: nothing is built
    caplog.set_level(logging.INFO, logger=_LOGGER)
    model, feeds = _requantize_at_ties()
    assert_bit_exact(lambda proto: build(proto, {"x": [8, 512]}, metaschedule_trials=4), model, feeds)
    expected = "tuning failed" if search == "fails" else "no valid schedule found"
    assert expected in caplog.text and "keeping the hand schedules" in caplog.text
    assert "takes the tuned schedule" not in caplog.text


@pytest.mark.slow
def test_a_tuned_schedule_is_bit_exact(tmp_path, monkeypatch, caplog) -> None:
    """Two real trials on the requantize kernel, the tuned schedule forced in whatever its speed: bit-exact at
    ties against the reference and the untuned build, the record in the cache's database (about 100 s: TVM
    registers every tensor intrinsic it ships when the search starts)."""
    monkeypatch.setenv("QCOMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(metaschedule, "MARGIN", float("inf"))
    caplog.set_level(logging.INFO, logger=_LOGGER)
    model, feeds = _requantize_at_ties()
    tuned = build(model, {"x": [8, 512]}, metaschedule_trials=2)
    assert "requantize takes the tuned schedule" in caplog.text
    assert_bit_exact(lambda proto: tuned, model, feeds)
    untuned = build(model, {"x": [8, 512]})
    for feed in feeds:
        np.testing.assert_array_equal(tuned.run(feed)[0], untuned.run(feed)[0])
    records = (tmp_path / metaschedule.WORK_DIR / "database_tuning_record.json").read_text().splitlines()
    assert records
