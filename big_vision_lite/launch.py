"""`bvl launch`: one `bvl` command run as N local processes of one JAX distributed program.

How the tests (and a user with one multi-device host) run several processes: each child is `bvl COMMAND ...` with
the environment `train.distributed` reads (`JAX_COORDINATOR_ADDRESS` on 127.0.0.1 and a free port,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, and `JAX_NUM_CPU_DEVICES` when devices per process are given, which JAX
reads itself). Every line a child prints comes out prefixed with its process id (`[1] ...`). When one child fails
(a non-zero exit or a signal, `kill -9` included), the others are stopped (SIGTERM, then SIGKILL after
STOP_GRACE_S) and the launch ends with one line naming the process that failed first and how (a survivor that JAX
ends with SIGABRT on losing a peer is named after it); its status is 2 when that process refused a bad input, 1
otherwise.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

STOP_GRACE_S = 5.0  # how long a stopped child may take to exit on SIGTERM before it is killed
_POLL_S = 0.1
_SETTLE_S = 0.5


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the coordinator binds it moments later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment(process_id: int, processes: int, port: int, devices_per_process: int | None,
                      base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of child `process_id`: who it is, where the coordinator listens, how many CPU devices."""
    env = dict(os.environ if base is None else base)
    env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
            "JAX_PROCESS_ID": str(process_id), "PYTHONUNBUFFERED": "1"}
    if devices_per_process is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    return env


def _describe(status: int) -> str:
    if status < 0:
        return f"was killed by signal {-status} ({signal.Signals(-status).name})"
    return f"exited with status {status}"


def _relay(index: int, stream: TextIO, out: TextIO, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(f"[{index}] {line}")
            out.flush()


def launch(command: Sequence[str], processes: int, devices_per_process: int | None = None, *,
           port: int | None = None, out: TextIO | None = None) -> int:
    """Runs `bvl *command` as `processes` processes of one distributed program; returns the launch's exit status
    (0 when every process succeeded)."""
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"--devices-per-process must be >= 1, got {devices_per_process}")
    if not command:
        raise ValueError("no command to launch: give one after `--`, e.g. `bvl launch --processes 2 -- train "
                         "siglip_shapes --workdir W`")
    out = sys.stdout if out is None else out
    port = port or free_port()
    lock = threading.Lock()
    children, relays = [], []
    for index in range(processes):
        child = subprocess.Popen([sys.executable, "-m", "big_vision_lite.cli", *command], text=True,
                                 env=child_environment(index, processes, port, devices_per_process),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        children.append(child)
        relay = threading.Thread(target=_relay, args=(index, child.stdout, out, lock), daemon=True)
        relay.start()
        relays.append(relay)
    try:
        while all(child.poll() in (None, 0) for child in children) and any(c.poll() is None for c in children):
            time.sleep(_POLL_S)
        time.sleep(_SETTLE_S)  # let the failures a first one causes land too, to tell cause from consequence
        failed = [(i, child.returncode) for i, child in enumerate(children) if child.poll() not in (None, 0)]
    finally:
        _stop(children)
        for relay in relays:
            relay.join(timeout=STOP_GRACE_S)
    if not failed:
        return 0
    # A peer that loses another ends itself from C++ with SIGABRT (JAX's fatal error): the cause is another one.
    index, status = next((f for f in failed if f[1] != -signal.SIGABRT), failed[0])
    also = [f"process {i} {_describe(s)}" for i, s in failed if i != index]
    others = processes - 1
    print(f"bvl launch: process {index} {_describe(status)}" + (f" ({'; '.join(also)} after it)" if also else "")
          + f"; stopped the other {others} process{'es' if others != 1 else ''}", file=sys.stderr)
    return 2 if status == 2 else 1


def _stop(children: list[subprocess.Popen]) -> None:
    """SIGTERM to every child still running, SIGKILL to those still running STOP_GRACE_S later."""
    running = [child for child in children if child.poll() is None]
    for child in running:
        child.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for child in running:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
