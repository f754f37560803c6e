"""Remote devices through TVM's RPC tracker: build here, then run, time and tune there.

A tracker (``python -m tvm.exec.rpc_tracker --host H --port P``) hands out sessions on the servers registered with
it under a key (``python -m tvm.exec.rpc_server --tracker H:P --key KEY``, on the device). ``compile(...,
rpc="H:P:KEY")`` asks the tracker for a session, reads the device's CPU from it (``target="llvm"`` means the
remote CPU, not this one), cross-compiles here, times the candidate GEMM tiles (``tune=True``) and MetaSchedule's
trials on the device, and returns a model whose calls run there: inputs are copied to the device, outputs back.

What runs remotely is TVM's own engine: :class:`tvm.rpc.RPCSession` (upload, ``load_module``, remote tensors and
time evaluators) and MetaSchedule's ``RPCRunner``; nothing here speaks the protocol itself. The library is linked
with this machine's toolchain (``export_library``'s default), so the device must run what it links: the same
architecture. Another architecture (AArch64 boards) needs a cross linker, which is not wired in yet."""

from __future__ import annotations

import dataclasses
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import tvm
from tvm import rpc

from qcompiler.errors import TargetError

#: seconds to wait for the tracker to accept a connection (TVM's own connect retries for a minute)
CONNECT_TIMEOUT_S = 5


@dataclasses.dataclass(frozen=True)
class Tracker:
    """An RPC tracker's address and the key its device servers registered under."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, text: str) -> Tracker:
        """``"host:port:key"`` (the form of TVM's ``--tracker`` plus the key).

        Raises:
            TargetError: the text is not of that form.
        """
        parts = str(text).rsplit(":", 2)
        if len(parts) != 3 or not all(parts) or not parts[1].isdigit() or not 0 < int(parts[1]) < 65536:
            raise TargetError(
                f"rpc: {text!r} is not 'host:port:key' (a TVM RPC tracker and the key its servers registered "
                "under, e.g. '127.0.0.1:9190:my-board')"
            )
        return cls(parts[0], int(parts[1]), parts[2])

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.key}"


class Device:
    """One session on a device of the tracker, kept open while the model (or a tuning run) uses it."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.session = _request(tracker)

    @property
    def tvm_device(self) -> Any:
        return self.session.cpu()

    def target(self) -> tvm.target.Target:
        """The device's CPU as an LLVM target (its CPU name and thread count, asked through the session).

        Raises:
            TargetError: the server runs TVM's runtime alone (no LLVM to ask): name the target instead.
        """
        try:
            cpu = str(self.session.get_function("target.llvm_get_system_cpu")())
            threads = int(self.session.get_function("runtime.NumThreads")())
        except (RuntimeError, AttributeError) as error:
            raise TargetError(
                f"rpc: the server behind {self.tracker} cannot tell its CPU ({error}); pass the target, "
                "e.g. {'kind': 'llvm', 'mcpu': 'cortex-a76', 'mtriple': 'aarch64-linux-gnu'}"
            ) from error
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": max(threads, 1)})

    def load(self, executable: Any) -> Any:
        """Upload ``executable`` (a built library) and load it on the device; the remote module."""
        with tempfile.TemporaryDirectory(prefix="qc_rpc_") as folder:
            path = Path(folder) / "library.so"
            executable.export_library(str(path))
            return self.load_file(path)

    def load_file(self, path: str | Path) -> Any:
        """Upload a library file written by ``export_library`` and load it on the device."""
        name = f"qcompiler-{uuid.uuid4().hex}.so"
        self.session.upload(str(path), target=name)
        return self.session.load_module(name)


def _request(tracker: Tracker) -> Any:
    """A session from the tracker on one of the key's servers.

    Raises:
        TargetError: the tracker does not answer, or no server is registered under the key.
    """
    where = f"{tracker.host}:{tracker.port}"
    try:
        socket.create_connection((tracker.host, tracker.port), timeout=CONNECT_TIMEOUT_S).close()  # TVM retries 60 s
        client = rpc.connect_tracker(tracker.host, tracker.port)
        queues = client.summary().get("queue_info", {})
    except (RuntimeError, OSError) as error:
        raise TargetError(
            f"rpc: no RPC tracker answers at {where} ({error}); start one with "
            f"`python -m tvm.exec.rpc_tracker --host {tracker.host} --port {tracker.port}`"
        ) from error
    if tracker.key not in queues:
        raise TargetError(
            f"rpc: no server is registered under key {tracker.key!r} at the tracker {where} (keys there: "
            f"{sorted(queues)}); start one on the device with "
            f"`python -m tvm.exec.rpc_server --tracker {where} --key {tracker.key}`"
        )
    try:
        return client.request(tracker.key, priority=1, session_timeout=0, max_retry=3)
    except (RuntimeError, OSError) as error:
        raise TargetError(f"rpc: the tracker at {where} gave no session for {tracker.key!r}: {error}") from error
