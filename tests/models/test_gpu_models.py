"""Issue 17 on real models: all-MiniLM-L6-v2 and a SmolLM2 block built for CUDA have integer-only PTX (float only
in the kernels at the graph's edges), and MiniLM built for OpenCL, the CUDA build's schedules run through pyopencl,
equals the CPU build bit for bit. (MNIST: tests/backends/test_gpu.py.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import qcompiler
from qcompiler.backends.tvm import build
from qcompiler.testing import EDGE_KERNELS, ptx_float_kernels, ptx_kernels

pytestmark = [pytest.mark.slow, pytest.mark.tvm]


def _assert_integer_ptx(ptx: str, kinds: tuple[str, ...]) -> None:
    names = list(ptx_kernels(ptx))
    for kind in kinds:
        assert any(kind in name for name in names), f"no {kind} kernel among {names}"
    assert ptx_float_kernels(ptx, EDGE_KERNELS) == {}
    assert "dp4a" in ptx


@pytest.fixture(scope="module")
def minilm():
    torch = pytest.importorskip("torch")
    from qcompiler.testing.encoders import CALIBRATION_OFFSET, load_minilm
    from qcompiler.testing.llm import ModelUnavailableError

    try:
        model = load_minilm()
    except ModelUnavailableError as missing:
        pytest.skip(str(missing))
    one = {k: v[:1] for k, v in model.batches(0, 1)[0].items()}  # one sentence: Oclgrind simulates every work-item
    batches = model.batches(CALIBRATION_OFFSET, 16)
    calibration = [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in (0, 4)]
    return model, one, calibration, torch


def _compiled(module, one, calibration, torch):
    example = (torch.from_numpy(one["ids"]), torch.from_numpy(one["mask"]))
    return qcompiler.compile(
        qcompiler.ir.load(module, example_inputs=example), "llvm", calibration=calibration, progress=False
    )


def test_minilm_for_cuda_has_integer_only_ptx(minilm) -> None:
    model, one, calibration, torch = minilm
    cpu = _compiled(model.encoder_module(), one, calibration, torch)
    cuda = build(cpu.integer_model, cpu.report["input_shapes"], {"kind": "cuda", "arch": "sm_90"})
    _assert_integer_ptx(cuda.sources["kernels.ptx"], ("qgemm", "int_layernorm", "int_softmax", "int_gelu"))


def test_minilm_on_opencl_equals_the_cpu_build(minilm) -> None:
    """The first of MiniLM's six layers (real weights; every kind of kernel the model has) at one sentence of
    32 tokens: Oclgrind takes about 9 minutes for all six, bit-exact too (docs/results.md)."""
    model, one, calibration, torch = minilm
    encoder = model.encoder_module()
    encoder.model = copy.deepcopy(encoder.model)
    encoder.model.encoder.layer = encoder.model.encoder.layer[:1]
    cpu = _compiled(encoder, one, calibration, torch)
    opencl = build(cpu.integer_model, cpu.report["input_shapes"], "opencl")
    feeds = dict(zip(cpu.input_names, (one["ids"], one["mask"]), strict=True))
    for got, want in zip(opencl.run(feeds), cpu.module.run(feeds), strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("recipe", ["w8a8-llm", "w4a8"])
def test_smollm2_block_for_cuda_has_integer_only_ptx(recipe: str) -> None:
    """One decoder layer of SmolLM2-135M (real weights, the tied 49152-row head) on a 64-token window."""
    torch = pytest.importorskip("torch")
    from qcompiler.testing.llm import ModelUnavailableError, load_smollm2

    try:
        smol = load_smollm2()
    except ModelUnavailableError as missing:
        pytest.skip(str(missing))
    smol.model.model.layers = smol.model.model.layers[:1]
    calibration = smol.calibration(4, window=64)
    example = (torch.from_numpy(calibration[0]["ids"]),)
    float_model = qcompiler.ir.load(smol.logits_module(), example_inputs=example)
    cpu = qcompiler.compile(float_model, "llvm", calibration=calibration, recipe=recipe, progress=False)
    cuda = build(cpu.integer_model, cpu.report["input_shapes"], "cuda")
    kernels = ("qgemm_int4",) if recipe == "w4a8" else ("qgemm",)
    _assert_integer_ptx(cuda.sources["kernels.ptx"], (*kernels, "int_layernorm", "int_softmax"))
