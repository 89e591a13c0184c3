"""One training program run as several processes under JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same `bvl train`; together they see one global device mesh. This module decides whether a
run is one of several processes, starts JAX's distributed runtime for it, and gives the loop the few
cross-process operations it needs. Nothing here is a protocol of our own: the coordinator, the heartbeats and the
collectives (gloo on the CPU) are JAX's.

Which processes a run belongs to (`process_group`), first match wins:

* `--coordinator HOST:PORT --num-processes N --process-id I` on the command line;
* the environment: `JAX_COORDINATOR_ADDRESS` (read by JAX itself) with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
  (what `bvl launch` sets), or a cluster JAX detects on its own (SLURM or Open MPI with more than one task; a
  Cloud TPU pod or Kubernetes job sets JAX_COORDINATOR_ADDRESS or is passed the flags);
* otherwise a single process, exactly as before.

Failure detection: a process that dies stops sending heartbeats, and JAX ends every other process of the group
from C++ (not with a Python exception) once HEARTBEAT_TIMEOUT_S passes, so no survivor hangs in a collective;
`bvl launch` stops the group at once. A coordinator that cannot be reached within the initialisation timeout
is reported as one clear error (JAX itself would abort with a C++ stack trace), and process counts that do not
agree are refused after joining (JAX would let a process that believes in another count join silently).
"""

import contextlib
import dataclasses
import json
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

HEARTBEAT_TIMEOUT_S = 15  # a dead peer ends the others this long after its last heartbeat (JAX's default: 100)
INIT_TIMEOUT_S = 60  # how long a process waits for the coordinator and its peers to come up (JAX's default: 300)
_CLUSTER_TASKS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")  # schedulers whose task counts JAX reads itself


class DistributedError(ValueError):
    """The processes of a run cannot form their group: an unreachable coordinator, counts or ids that disagree."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a multi-process run; None fields are left for JAX's cluster detection."""

    coordinator: str | None  # HOST:PORT of process 0's coordination service
    num_processes: int | None
    process_id: int | None


def _parse_coordinator(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DistributedError(f"coordinator {address!r} must be HOST:PORT with PORT in [1, 65535]")
    return host, int(port)


def process_group(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                  environ: Mapping[str, str] | None = None) -> ProcessGroup | None:
    """The group this process belongs to (see the module docstring), or None for a single-process run."""
    env = os.environ if environ is None else environ
    flags = (coordinator, num_processes, process_id)
    if any(value is not None for value in flags):
        if None in flags:
            raise DistributedError("--coordinator, --num-processes and --process-id go together (got "
                                   f"{coordinator!r}, {num_processes!r}, {process_id!r})")
        group = ProcessGroup(coordinator, num_processes, process_id)
    elif "JAX_COORDINATOR_ADDRESS" in env:
        group = ProcessGroup(env["JAX_COORDINATOR_ADDRESS"], _env_int(env, "JAX_NUM_PROCESSES"),
                             _env_int(env, "JAX_PROCESS_ID"))
    elif any(int(env.get(name, "1") or 1) > 1 for name in _CLUSTER_TASKS):
        group = ProcessGroup(None, None, None)
    else:
        return None
    if group.coordinator is not None:
        _parse_coordinator(group.coordinator)
    if group.num_processes is not None and group.num_processes < 1:
        raise DistributedError(f"the number of processes must be >= 1, got {group.num_processes}")
    if group.process_id is not None and group.num_processes is not None and \
            not 0 <= group.process_id < group.num_processes:
        raise DistributedError(f"process id {group.process_id} is outside [0, {group.num_processes - 1}] for "
                               f"{group.num_processes} processes")
    return group


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} must be an integer") from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once a TCP connection to `address` succeeds; raises DistributedError after `timeout_s`."""
    host, port = _parse_coordinator(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise DistributedError(f"coordinator {address} could not be reached within {timeout_s:g} s "
                                       f"({error.strerror or error}); is process 0 running, and is the address "
                                       "right?") from None
            time.sleep(0.25)


def initialize(group: ProcessGroup, timeout_s: float = INIT_TIMEOUT_S) -> None:
    """Joins `group` through `jax.distributed.initialize`; call before anything starts JAX's backend.

    Processes other than 0 first wait (up to `timeout_s`) for the coordinator to answer, so a wrong address or a
    missing process 0 is one clear DistributedError instead of JAX's abort from C++. After joining, the count of
    processes each one was told is checked against the group JAX formed.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    if group.coordinator is not None and group.process_id not in (None, 0):
        _wait_for_coordinator(group.coordinator, timeout_s)
    jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id,
                               initialization_timeout=int(timeout_s), heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    told = np.asarray([group.num_processes or jax.process_count(), jax.process_index()], np.int64)
    everyone = np.asarray(multihost_utils.process_allgather(told)).reshape(-1, 2)  # [processes, 2]
    if (everyone[:, 0] != jax.process_count()).any():
        raise DistributedError(f"the processes disagree on their number: told {everyone[:, 0].tolist()} (by process "
                               f"id {everyone[:, 1].tolist()}), but {jax.process_count()} joined")


def is_main_process() -> bool:
    """Whether this process writes the run's files (metrics, plots, run records): process 0."""
    return jax.process_index() == 0


def broadcast_json(value: Any) -> Any:
    """Process 0's `value` (anything JSON holds) on every process; the others' `value` is ignored.

    How a decision taken on process 0 (the latest checkpoint, an error found in the workdir) reaches the group.
    """
    if jax.process_count() == 1:
        return value
    payload = json.dumps(value).encode() if is_main_process() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    buffer = np.zeros(size, np.uint8)
    if is_main_process():
        buffer[:] = np.frombuffer(payload, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[None]:
    """Process 0 runs the block first (it may write shared files, e.g. a trained tokenizer); the others run it once
    process 0 is done, and find those files. An error on process 0 reaches the others as DistributedError naming
    `name`, so none waits at the barrier for a peer that has failed."""
    if jax.process_count() == 1:
        yield
        return
    if not is_main_process():
        error = broadcast_json(None)
        if error is not None:
            raise DistributedError(f"process 0 stopped the run while {name}: {error}")
        yield
        return
    try:
        yield
    except Exception as error:
        broadcast_json(f"{type(error).__name__}: {error}")
        raise
    broadcast_json(None)


def on_main_process(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` run on process 0 only and its JSON result returned on every process: how a decision
    about the shared workdir (its lock, its config, its latest checkpoint) is taken once. An error raised there is
    raised again on process 0 and, as DistributedError naming `name`, on the others, so none waits for it."""
    if jax.process_count() == 1:
        return fn(*args, **kwargs)
    if not is_main_process():
        outcome = broadcast_json(None)
        if "error" in outcome:
            raise DistributedError(f"process 0 stopped the run while {name}: {outcome['error']}")
        return outcome["value"]
    try:
        value = fn(*args, **kwargs)
    except Exception as error:
        broadcast_json({"error": f"{type(error).__name__}: {error}"})
        raise
    broadcast_json({"value": value})
    return value


def all_processes_agree(ok: bool) -> bool:
    """Whether `ok` is True on every process (every process must call it)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def process_rows(global_rows: int) -> tuple[int, int]:
    """(lo, hi): the rows of a global batch of `global_rows` this process builds. A batch split over a mesh of
    `jax.devices()` (which JAX orders by process) gives each process one contiguous block of rows."""
    count, index = jax.process_count(), jax.process_index()
    if global_rows % count:
        raise ValueError(f"the global batch of {global_rows} does not split evenly over {count} processes")
    share = global_rows // count
    return index * share, (index + 1) * share


def gather_objects(value: Any) -> list[Any]:
    """`value` (anything pickle holds) of every process, in process order; every process must call it. How each
    process's share of an evaluation is put back together."""
    if jax.process_count() == 1:
        return [value]
    payload = np.frombuffer(pickle.dumps(value), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(payload.size))).reshape(-1)  # [processes]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)  # [processes, bytes]
    return [pickle.loads(row[:size].tobytes()) for row, size in zip(everyone, sizes.tolist(), strict=True)]


def host_copy(tree: Any) -> Any:
    """Every leaf of `tree` whole, as numpy, on every process (an all-gather: every process must call it)."""
    return multihost_utils.process_allgather(tree, tiled=True)
