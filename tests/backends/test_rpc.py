"""Issue 20: remote devices through TVM's RPC. A tracker and two device servers run on loopback for this module
(started and stopped by the fixture, bounded in time); ``compile(..., rpc=...)`` builds here, times the GEMM tiles
there and returns a model that runs there, with the same outputs as the local build. Bad addresses and keys fail
with a TargetError that says what to start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import qcompiler
from qcompiler.backends.tvm import tuning
from qcompiler.backends.tvm.remote import Device, Tracker
from qcompiler.errors import TargetError
from qcompiler.files import LIBRARY_FILE
from qcompiler.testing.data import mnist_model_path

pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado: pip install -e '.[dev]'")

pytestmark = pytest.mark.tvm

KEY = "qc-loopback"
SERVERS = 2
START_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(*args: str) -> subprocess.Popen:
    """A TVM RPC process in its own process group (the server forks a worker per session: stop them all)."""
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _wait(ready, deadline: float, what: str) -> None:
    while True:
        try:
            if ready():
                return
        except (RuntimeError, OSError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} of the loopback RPC set-up did not start in {START_TIMEOUT_S}s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tracker() -> Iterator[str]:
    """``host:port:key`` of a loopback tracker with SERVERS servers registered under KEY."""
    from tvm import rpc

    port = _free_port()
    processes = [
        _start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))
    ]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        _wait(lambda: rpc.connect_tracker("127.0.0.1", port).summary() is not None, deadline, "the tracker")
        server_port = _free_port()
        for index in range(SERVERS):
            processes.append(
                _start(
                    "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port + 10 * index),
                    "--port-end", str(server_port + 10 * index + 9), "--tracker", f"127.0.0.1:{port}", "--key", KEY,
                )
            )  # fmt: skip
        registered = lambda: rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(KEY, {})  # noqa: E731
        _wait(lambda: registered().get("free", 0) >= SERVERS, deadline, f"{SERVERS} servers")
        yield f"127.0.0.1:{port}:{KEY}"
    finally:
        for process in reversed(processes):
            _stop(process)


@pytest.fixture(scope="module")
def digits() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(4)]


@pytest.fixture(scope="module")
def local_mnist(digits) -> qcompiler.CompiledModel:
    return qcompiler.compile(str(mnist_model_path()), "llvm", calibration=digits, progress=False)


def test_remote_build_runs_there_and_matches_the_local_build(tracker, digits, local_mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILER_CACHE_DIR", str(tmp_path / "cache"))
    uploads: list[str] = []
    upload = Device.load

    def counted(self: Device, executable: object) -> object:
        uploads.append(str(self.tracker))
        return upload(self, executable)

    monkeypatch.setattr(Device, "load", counted)
    remote = qcompiler.compile(
        str(mnist_model_path()), "llvm", calibration=digits, progress=False, tune=True, rpc=tracker
    )
    tiles = len(tuning.TileCache(tmp_path / "cache"))
    assert tiles > 0, "tuning through the tracker picked no tile"
    assert len(uploads) > tiles, "the candidate tiles were not timed on the remote device"
    assert remote.report["device"] == f"rpc:{tracker}"
    for image in digits:
        np.testing.assert_array_equal(remote(image), local_mnist(image))
    assert all(str(t.device).startswith("remote") for t in remote.module._staging.values()), "ran here, not there"
    assert remote.module.time({"Input3": digits[0]}, number=2, repeat=2) > 0


def test_a_saved_model_loads_onto_the_device(tracker, digits, local_mnist, tmp_path) -> None:
    local_mnist.save(tmp_path / "mnist")
    there = qcompiler.load(tmp_path / "mnist", rpc=tracker)
    assert there.module.where == f"rpc:{tracker}"
    np.testing.assert_array_equal(there(digits[1]), local_mnist(digits[1]))
    assert all(str(t.device).startswith("remote") for t in there.module._staging.values()), "ran here, not there"
    with pytest.raises(TargetError, match="RPC cannot carry"):
        there.profile(digits[1])


def test_the_device_target_is_read_through_the_session(tracker) -> None:
    device = Device(Tracker.parse(tracker))
    target = device.target()
    assert target.kind.name == "llvm"
    assert str(target.attrs["mcpu"]) and int(target.attrs["num-cores"]) >= 1


@pytest.mark.parametrize("address", ["localhost:9190", "localhost:port:key", ":9190:key", "host:70000:key"])
def test_a_malformed_address_is_refused_by_name(address: str) -> None:
    with pytest.raises(TargetError, match="host:port:key"):
        Tracker.parse(address)


def test_no_tracker_and_an_unknown_key_say_what_to_start(tracker) -> None:
    with pytest.raises(TargetError, match="tvm.exec.rpc_tracker"):
        qcompiler.compile(str(mnist_model_path()), calibration=[], rpc=f"127.0.0.1:{_free_port()}:{KEY}")
    host, port, _ = tracker.split(":")
    with pytest.raises(TargetError, match=r"no server is registered under key 'other'.*tvm.exec.rpc_server"):
        qcompiler.compile(str(mnist_model_path()), calibration=[], rpc=f"{host}:{port}:other")


def test_cli_compile_through_rpc(tracker, digits, tmp_path: Path) -> None:
    np.savez(tmp_path / "calibration.npz", Input3=np.stack(digits))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "qcompiler", "compile", str(mnist_model_path()), "--calibration",
         str(tmp_path / "calibration.npz"), "-o", str(out), "-q", "--rpc", tracker],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"(rpc:{tracker})" in done.stdout
    assert (out / LIBRARY_FILE).is_file()


def test_metaschedule_measures_on_the_device(tracker) -> None:
    """MetaSchedule's RPC runner (what ``metaschedule_trials`` uses with ``rpc``) times a kernel on the device."""
    import tvm
    from tvm import te

    from qcompiler.backends.tvm import metaschedule, resolve_target

    a = te.placeholder((4096,), "int32", name="a")
    doubled = te.compute((4096,), lambda i: a[i] * 2, name="doubled")
    target, _ = resolve_target("llvm")
    seconds = metaschedule.measure([te.create_prim_func([a, doubled])], target, Tracker.parse(tracker))
    assert len(seconds) == 1 and 0 < seconds[0] < 1, seconds
    assert isinstance(metaschedule._runner(Tracker.parse(tracker)), tvm.s_tir.meta_schedule.runner.RPCRunner)
