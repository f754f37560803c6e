"""GPU targets without a GPU: CUDA code whose PTX has no floating-point instruction (nvcc is on every machine here),
and the same GPU schedules built as OpenCL and run through pyopencl (PoCL or Oclgrind on the CPU), bit-exact
against the reference semantics and against the CPU build. What only CUDA has (dp4a, mma) waits for a device:
benchmarks/bench_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.api import quantize_to_integer
from qcompiler.backends.tvm import build, resolve_target
from qcompiler.backends.tvm import gpu as gpu_backend
from qcompiler.backends.tvm import opencl as opencl_backend
from qcompiler.dialect import DOMAIN
from qcompiler.errors import TargetError
from qcompiler.testing import (
    EDGE_KERNELS,
    GeneratedModel,
    assert_bit_exact,
    attention_models,
    ptx_float_kernels,
    ptx_kernels,
    token_mlp_models,
)
from qcompiler.testing.data import digits_28x28, mnist_model_path
from qcompiler.testing.kernel_models import KernelCase, kernel_cases

pytestmark = pytest.mark.tvm


def _opencl(shapes):
    return lambda proto: build(proto, shapes, "opencl")


# --- the PTX check and its positive control ------------------------------------------------------------------


def _float_requantize_model():
    """int32 -> int8 rescale in the float form a careless lowering would leave, ``QuantizeLinear(DequantizeLinear(x))``,
    which TVM compiles to f32 multiplies: the positive control of the PTX check."""
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["x", "s"], ["f"]),
            helper.make_node("QuantizeLinear", ["f", "s2", "z"], ["y"]),
        ],
        "float_requantize",
        [helper.make_tensor_value_info("x", TensorProto.INT32, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
        [
            numpy_helper.from_array(np.array(0.001, np.float32), "s"),
            numpy_helper.from_array(np.array(0.5, np.float32), "s2"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])


def test_ptx_check_catches_a_float_requantize_and_passes_the_dyadic_one() -> None:
    dyadic = next(case for case in kernel_cases() if case.name == "requantize ties")
    integer = build(dyadic.model, dyadic.shapes, "cuda")
    control = build(_float_requantize_model(), {"x": [4, 64]}, "cuda")
    assert ptx_kernels(integer.sources["kernels.ptx"]) and not ptx_float_kernels(integer.sources["kernels.ptx"])
    caught = ptx_float_kernels(control.sources["kernels.ptx"])
    assert caught and any("mul.f32" in ops or "mul.rn.f32" in ops for ops in caught.values()), caught


def test_ptx_allow_list_flags_unknown_opcodes_and_float_registers() -> None:
    ptx = """
.visible .entry k(
    .param .u64 k_param_0
)
{
    .reg .b32 %r<4>;
    ld.param.u64 %rd1, [k_param_0];
    @%p1 bra $L__BB0_2;
    dp4a.s32.s32 %r1, %r2, %r3, %r1;
$L__BB0_2:
    ret;
}
.visible .entry f(
    .param .u64 f_param_0
)
{
    .reg .f32 %f<2>;
    ex2.approx.ftz.f32 %f1, %f1;
    tex.2d.v4.s32.s32 {%r1, %r2, %r3, %r4}, [t, {%r5, %r6}];
    ret;
}
"""
    assert ptx_float_kernels(ptx) == {"f": [".reg .f32", "ex2.approx.ftz.f32", "tex.2d.v4.s32.s32"]}


# --- OpenCL: every kernel bit-exact against the reference, ties and extremes -----------------------------------


@pytest.mark.parametrize("case", kernel_cases(), ids=lambda case: case.name)
def test_opencl_kernel_bit_exact(case: KernelCase) -> None:
    """QGemm (-128 weights, int16 output), QConv, QGemmInt4 (-8 codes), Requantize, RescaleAdd and
    QuantizeLinear at rounding ties, every activation at each extreme: the reference's answer, bit for bit."""
    assert_bit_exact(_opencl(case.shapes), case.model, case.feeds)


def _check_block(generated: GeneratedModel) -> None:
    """A generated block through the whole pipeline, built for OpenCL: bit-exact against the reference."""
    _, integer, _, shapes = quantize_to_integer(generated.model, calibration=generated.inputs(8), progress=False)
    assert_bit_exact(_opencl(shapes), integer, generated.inputs(2, offset=1))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_mlp_models())
def test_opencl_generated_token_mlp_blocks(generated: GeneratedModel) -> None:
    """LayerNorm, GELU or Sigmoid tables, Softmax, residual adds: the row-wise kernels under DLight's schedules."""
    _check_block(generated)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_models())
def test_opencl_generated_attention_blocks(generated: GeneratedModel) -> None:
    """Q K^T and P V (int8 batched products), the integer softmax between them."""
    _check_block(generated)


# --- whole models ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_calibration():
    images, _ = digits_28x28()
    return [images[i : i + 1] for i in range(8)], images


def test_mnist_on_opencl_equals_the_cpu_build_and_reloads(mnist_calibration, tmp_path) -> None:
    calibration, images = mnist_calibration
    path = str(mnist_model_path())
    cpu = qcompiler.compile(path, target="llvm", calibration=calibration, progress=False)
    gpu = qcompiler.compile(path, target="opencl", calibration=calibration, progress=False)
    assert gpu.report["target_kind"] == "opencl" and gpu.module.where == "opencl"
    for i in range(8, 11):
        assert np.array_equal(gpu(images[i : i + 1]), cpu(images[i : i + 1]))
    gpu.save(tmp_path / "m")
    assert (tmp_path / "m" / "kernels.cl").read_text().count("__kernel") >= 5
    back = qcompiler.load(tmp_path / "m")
    assert np.array_equal(back(images[20:21]), cpu(images[20:21]))


def test_mnist_for_cuda_has_integer_only_ptx_and_saves_its_code(mnist_calibration, tmp_path) -> None:
    calibration, images = mnist_calibration
    model = qcompiler.compile(
        str(mnist_model_path()), target={"kind": "cuda", "arch": "sm_90"}, calibration=calibration, progress=False
    )
    ptx = model.module.sources["kernels.ptx"]
    kernels = ptx_kernels(ptx)
    assert any("qconv" in k for k in kernels) and any("qgemm" in k for k in kernels)
    assert ptx_float_kernels(ptx, EDGE_KERNELS) == {}
    assert "dp4a" in ptx  # nvcc turns the int8 dot products into the int8 dot instruction
    assert ".target sm_90" in ptx
    model.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"model.so", "kernels.cu", "kernels.ptx", "report.json"}
    if gpu_backend.local_cuda_arch() is None:
        with pytest.raises(TargetError, match="no CUDA GPU"):
            model(images[:1])


# --- targets and their errors ----------------------------------------------------------------------------------


def test_cuda_target_defaults_and_named_errors(monkeypatch) -> None:
    target, _ = resolve_target({"kind": "cuda", "arch": "sm_89"})
    assert target.kind.name == "cuda" and str(target.attrs["arch"]) == "sm_89" and target.host.kind.name == "llvm"
    if gpu_backend.local_cuda_arch() is None:
        assert str(resolve_target("cuda")[0].attrs["arch"]) == gpu_backend.DEFAULT_CUDA_ARCH
    with pytest.raises(TargetError, match=r"CUDA arch 'sm_61' is not supported; use one of \['sm_75'"):
        resolve_target({"kind": "cuda", "arch": "sm_61"})
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(TargetError, match="needs nvcc"):
        resolve_target("cuda")
    with pytest.raises(TargetError, match="needs nvcc"):
        qcompiler.compile(str(mnist_model_path()), target="cuda", progress=False)


def test_gpu_targets_refuse_cpu_only_options() -> None:
    with pytest.raises(TargetError, match="CPU-only"):
        qcompiler.compile(str(mnist_model_path()), target="opencl", tune=True, progress=False)


def test_opencl_without_pyopencl_says_what_to_install(monkeypatch) -> None:
    import importlib

    real = importlib.import_module

    def missing(name, *args, **kwargs):
        if name == "pyopencl":
            raise ImportError("No module named 'pyopencl'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(opencl_backend.importlib, "import_module", missing)
    opencl_backend.opencl_device.cache_clear()
    try:
        with pytest.raises(TargetError, match="pip install pyopencl"):
            resolve_target("opencl")
    finally:
        opencl_backend.opencl_device.cache_clear()


_RACE_SCRIPT = """
import sys
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from qcompiler.api import quantize_to_integer
from qcompiler.backends.tvm import build
from qcompiler.backends.tvm.opencl import opencl_device, pyopencl
from qcompiler.testing import attention_models, token_mlp_models

if sys.argv[1] == "control":  # a local-memory exchange without its barrier
    cl = pyopencl()
    context = cl.Context([opencl_device()])
    source = (
        "__kernel void f(__global int* a) {"
        " __local int s[64]; int t = get_local_id(0); s[t] = t; a[t] = s[63 - t]; }"
    )
    kernel = cl.Program(context, source).build().f
    queue = cl.CommandQueue(context)
    kernel(queue, (64,), (64,), cl.Buffer(context, cl.mem_flags.READ_WRITE, 256))
    queue.finish()
else:
    for strategy in (token_mlp_models(), attention_models()):
        @settings(max_examples=3, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(generated):
            calibration = generated.inputs(8)
            _, integer, _, shapes = quantize_to_integer(generated.model, calibration=calibration, progress=False)
            build(ir.serde.serialize_model(integer), shapes, "opencl").run(generated.inputs(1, offset=1)[0])
        run()
print("ran", opencl_device().name)
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["control", "kernels"])
def test_opencl_kernels_have_no_data_race_under_oclgrind(case: str) -> None:
    """Oclgrind's race detector over the GPU schedules of generated transformer blocks (shared-memory reductions,
    barriers); the control, a missing barrier, must be reported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, opencl_backend.PLATFORM_VARIABLE: "oclgrind", "OCLGRIND_DATA_RACES": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _RACE_SCRIPT, case], capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert done.returncode == 0 and "ran Oclgrind" in done.stdout, done.stderr[-3000:]
    raced = "data race" in done.stderr
    assert raced == (case == "control"), done.stderr[-3000:]
