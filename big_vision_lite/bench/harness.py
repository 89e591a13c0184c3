"""What every benchmark shares: interleaved timing, the record of the machine it ran on, the CPU share other
processes took meanwhile, deterministic inputs, both sides of a decoder benchmark, and the result contract.

Axis letters: B batch, T tokens.

The result contract: every benchmark's `run_*` returns a JSON-serialisable dict with at least `benchmark` (its
name), `ok` (a bool: its targets were met) and `env` (`environment`); `report` prints its table, writes that dict
as JSON and turns `ok` into the exit status of `bvl bench`.

Timing: the sides of a benchmark run in turn, round after round, the order rotating each round
(`interleaved_times`), so background load on a shared machine hits all of them alike. `background_cpu` measures
that load (from /proc/stat): on a 2-core machine a busy neighbour slows torch's OpenMP threads far more than XLA's
thread pool, so only runs on a quiet machine give fair ratios, and the tables warn (`busy_warning`) above
`BUSY_WARNING`.
"""

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from big_vision_lite.checkpoints import Loaded, detect_kind, load
from big_vision_lite.parity.torch_side import load_reference
from big_vision_lite.utils.atomic import write_text_atomic

BUSY_WARNING = 0.05  # the tables warn when other processes used more than this fraction of the CPUs while timing
RESULT_KEYS = ("benchmark", "ok", "env")  # what every benchmark's result holds (see the module docstring)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): other work skews every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def peak_rss_gib() -> float | None:
    """This process's peak resident memory so far, in GiB (None where `resource` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 2**20, 2)


def cpu_counters() -> tuple[float, float, float] | None:
    """(machine busy CPU-seconds, this process's CPU-seconds, wall seconds); None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()


def background_cpu(start: tuple[float, float, float] | None) -> float | None:
    """Fraction of the machine's CPU time other processes used since `start` (0: quiet, 1: every core busy)."""
    end = cpu_counters()
    if start is None or end is None or end[2] <= start[2]:
        return None
    others = (end[0] - start[0]) - (end[1] - start[1])
    return round(min(max(others / ((end[2] - start[2]) * (os.cpu_count() or 1)), 0.0), 1.0), 3)


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function over `repeats` rounds; round r starts at the r-th function (rotation)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def timed_interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int
                      ) -> tuple[dict[str, list[float]], float | None]:
    """`interleaved_times`, and the CPU share other processes took meanwhile (`background_cpu`)."""
    counters = cpu_counters()
    times = interleaved_times(fns, repeats)
    return times, background_cpu(counters)


def median_ms(seconds: Sequence[float]) -> float:
    """The median of `seconds`, in milliseconds rounded to the microsecond (how the results report times)."""
    return round(float(np.median(seconds)) * 1e3, 3)


def times_ms(seconds: Sequence[float]) -> list[float]:
    """Every one of `seconds` in milliseconds rounded to the microsecond (the results' raw samples)."""
    return [round(t * 1e3, 3) for t in seconds]


def busy_cell(fraction: float | None) -> str:
    """A table cell for a `background_cpu` fraction: "12%", or "n/a" where it could not be measured."""
    return "n/a" if fraction is None else f"{fraction:.0%}"


def busy_warning(fractions: Iterable[float | None], effect: str) -> str | None:
    """The table line warning that other processes took more than `BUSY_WARNING` of the CPUs while timing (the
    largest of `fractions`) and what that does to this benchmark's figures (`effect`); None on a quiet machine."""
    busiest = max((f for f in fractions if f is not None), default=0.0)
    if busiest <= BUSY_WARNING:
        return None
    return (f"warning: other processes used up to {busiest:.0%} of the CPUs while timing; {effect}: rerun on a "
            "quiet machine")


@contextlib.contextmanager
def torch_num_threads(threads: int) -> Iterator[None]:
    """torch runs on `threads` threads inside the block (the block may change it again); torch's previous setting
    is restored after it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def environment(*, loadavg_start: list[float] | None, torch_threads: int | None = None,
                compiler_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `env` of a result: JAX's versions, backend, device and XLA settings (`compiler_options`: those given to
    `.compile()`), the machine, the load averages at the start (`loadavg_start`, taken by the caller) and now; with
    `torch_threads` (the threads torch timed with) also torch's and transformers' versions and threads."""
    import jaxlib

    env: dict[str, Any] = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": dict(compiler_options or {}),
    }
    if torch_threads is not None:
        import torch
        import transformers

        env |= {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_num_threads": torch_threads,
            "torch_num_interop_threads": torch.get_num_interop_threads(),
        }
    return env | {
        "cpu_count": cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg(),
    }


def bench_tokens(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """Deterministic token ids [B, T] int32 in [1, vocab_size) (0 is left out: it is the pad id of most models)."""
    return np.random.default_rng(seed).integers(1, vocab_size, size=(batch, seq_len), dtype=np.int32)


def load_both_sides(model: str, dtype: str, scan_layers: bool, attn_implementations: Sequence[str]
                    ) -> tuple[Loaded, dict[str, Any], dict[str, float]]:
    """Our decoder (`checkpoints.load`) and a transformers model per attention implementation, all read from the
    same HF folder (a packaged name resolves to its converted folder, `Loaded.source`), and the seconds each load
    took (`ours` and one per implementation)."""
    if (kind := detect_kind(model)) != "decoder":
        raise ValueError(f"{model} is a {kind} model; this benchmark times decoders")
    load_s: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load(model, dtype, scan_layers=scan_layers)
    jax.block_until_ready(loaded.params)
    load_s["ours"] = time.perf_counter() - t0
    refs = {}
    for impl in attn_implementations:
        t0 = time.perf_counter()
        refs[impl] = load_reference("decoder", loaded.source, dtype, attn_implementation=impl)
        load_s[impl] = time.perf_counter() - t0
    return loaded, refs, load_s


def check_result(result: Mapping[str, Any]) -> None:
    """Refuses a result that breaks the contract (see the module docstring)."""
    if missing := [key for key in RESULT_KEYS if key not in result]:
        raise ValueError(f"the benchmark result lacks {', '.join(missing)}")
    if not isinstance(result["ok"], bool):
        raise ValueError(f"the benchmark result's ok must be a bool, got {result['ok']!r}")


def report(result: dict[str, Any], table: str, json_path: str | Path | None) -> int:
    """What `bvl bench` does with a result: prints `table`, writes `result` as JSON to `json_path` (atomically,
    creating its folder; None writes nothing) and returns the exit status: 0 when `ok`, 1 when a target was
    missed."""
    check_result(result)
    print(table)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1
