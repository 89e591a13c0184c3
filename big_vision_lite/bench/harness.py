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

Training steps (`train_step_timing`): our compiled step (`JaxStepRunner`) and PyTorch steps (`TorchStepRunner`,
optimised by `torch_adamw`) first take the same untimed checked steps, torch is probed at each thread count
(`probe_torch_threads`), then blocks of steps are timed interleaved.
"""

import contextlib
import functools
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


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b| (b's magnitude floored at 1e-30)."""
    return abs(a - b) / max(abs(b), 1e-30)


TRAIN_FIRST_LOSS_TOL = 1e-4  # train-step benches: relative difference of the first loss (same weights and batch)
TRAIN_CHECK_LOSS_TOL = 1e-3  # ... of the loss after the check steps (float32 drift of the updates)


def train_step_summary(per_step: dict[str, list[float]], check: dict[str, list[float]], final: dict[str, float],
                       batch_size: int, impls: Sequence[str], target: float) -> dict[str, Any]:
    """The figures every train-step bench reports from `train_step_timing`'s output: per PyTorch side (`impls`)
    its median step, examples/s and losses beside ours (`torch_sides`); the faster side, `ratio` = our examples/s
    over its, and whether every side's losses agree with ours (`losses_agree`)."""
    step_s = {name: float(np.median(ts)) for name, ts in per_step.items()}
    best = min(impls, key=step_s.__getitem__)
    sides = {impl: {
        "step_ms": median_ms(per_step[impl]),
        "examples_per_s": round(batch_size / step_s[impl], 2),
        "first_loss": check[impl][0],
        "first_loss_rel_diff": rel_diff(check["ours"][0], check[impl][0]),
        "check_loss_rel_diff": rel_diff(check["ours"][-1], check[impl][-1]),
        "final_loss": final[impl],
        "final_loss_rel_diff": rel_diff(final["ours"], final[impl]),
    } for impl in impls}
    agree = all(side["first_loss_rel_diff"] <= TRAIN_FIRST_LOSS_TOL
                and side["check_loss_rel_diff"] <= TRAIN_CHECK_LOSS_TOL for side in sides.values())
    ours_ex_s = batch_size / step_s["ours"]
    return {
        "ours_examples_per_s": round(ours_ex_s, 2),
        "torch_examples_per_s": sides[best]["examples_per_s"],
        "torch_attn_implementation": best,
        "ratio": round(ours_ex_s / (batch_size / step_s[best]), 4),
        "target": target,
        "ours_step_ms": median_ms(per_step["ours"]),
        "torch_step_ms": sides[best]["step_ms"],
        "times_ms": {name: times_ms(ts) for name, ts in per_step.items()},
        "torch_sides": sides,
        "first_loss_ours": check["ours"][0],
        "first_loss_torch": sides[best]["first_loss"],
        "first_loss_rel_diff": sides[best]["first_loss_rel_diff"],
        "check_losses": check,
        "check_loss_rel_diff": sides[best]["check_loss_rel_diff"],
        "loss_change": {name: losses[-1] - losses[0] for name, losses in check.items()},
        "final_loss_ours": final["ours"],
        "final_loss_torch": sides[best]["final_loss"],
        "final_loss_rel_diff": sides[best]["final_loss_rel_diff"],
        "loss_tolerances": {"first": TRAIN_FIRST_LOSS_TOL, "check": TRAIN_CHECK_LOSS_TOL},
        "losses_agree": agree,
    }


class JaxStepRunner:
    """A compiled train step over a donated state, cycling through `batches`; `run(n)` takes n steps and waits for
    their results (`block_until_ready`)."""

    def __init__(self, compiled: Any, state: Any, batches: Sequence[Any]):
        self.compiled, self.state, self.batches = compiled, state, batches
        self.steps_done = 0
        self.last_metrics: dict[str, jax.Array] = {}

    def run(self, n: int) -> list[jax.Array]:
        losses = []
        for _ in range(n):
            batch = self.batches[self.steps_done % len(self.batches)]
            self.state, self.last_metrics = self.compiled(self.state, batch)
            losses.append(self.last_metrics["loss"])
            self.steps_done += 1
        jax.block_until_ready((self.state, self.last_metrics))
        return losses


class TorchStepRunner:
    """A PyTorch train step: `loss_fn(batch)` (forward and loss), backward, global-norm clipping of `params` (the
    trained tensors), `optimizer` and `scheduler` steps, cycling through `batches`; `run(n)` takes n steps."""

    def __init__(self, loss_fn: Callable[[Any], Any], params: Sequence[Any], optimizer: Any, scheduler: Any,
                 batches: Sequence[Any], clip_norm: float | None):
        self.loss_fn, self.params, self.optimizer, self.scheduler = loss_fn, list(params), optimizer, scheduler
        self.batches, self.clip_norm = batches, clip_norm
        self.steps_done = 0
        self.last_loss: Any = None

    def step(self) -> Any:
        import torch

        loss = self.loss_fn(self.batches[self.steps_done % len(self.batches)])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.steps_done += 1
        self.last_loss = loss.detach()
        return self.last_loss

    def run(self, n: int) -> list[Any]:
        return [self.step() for _ in range(n)]


def torch_adamw(decayed: Sequence[Any], not_decayed: Sequence[Any], opt: Mapping[str, Any],
                schedule_values: np.ndarray, fused: bool) -> tuple[Any, Any]:
    """(torch AdamW, LambdaLR) making optax's updates: `opt` holds our optimizer's lr, b1, b2 and weight_decay
    (applied to `decayed` only); the scheduler replays `schedule_values` (the lr at each step, from 0)."""
    import torch

    groups = [{"params": list(decayed), "weight_decay": opt["weight_decay"]},
              {"params": list(not_decayed), "weight_decay": 0.0}]
    # optax's adamw: eps 1e-8 added to sqrt(v_hat), decoupled decay lr * wd * p: torch's AdamW does the same.
    optimizer = torch.optim.AdamW(groups, lr=opt["lr"], betas=(opt["b1"], opt["b2"]), eps=1e-8, fused=fused)
    last = len(schedule_values) - 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: float(schedule_values[min(s, last)]) / opt["lr"])  # s = steps taken so far, like optax
    return optimizer, scheduler


def probe_torch_threads(runners: Mapping[str, TorchStepRunner], candidates: Sequence[int], steps: int
                        ) -> dict[int, dict[str, float]]:
    """Seconds per step of `steps` steps of every torch side at each thread count (untimed in the result)."""
    import torch

    probe: dict[int, dict[str, float]] = {}
    for n in candidates:
        torch.set_num_threads(n)
        probe[n] = {}
        for impl, runner in runners.items():
            t0 = time.perf_counter()
            runner.run(steps)
            probe[n][impl] = (time.perf_counter() - t0) / steps
    return probe


def torch_thread_candidates(torch_threads: int | None) -> list[int]:
    """The thread counts torch is probed at: `torch_threads` alone, or every CPU and 1 (None)."""
    return [torch_threads] if torch_threads else sorted({cpu_count(), 1}, reverse=True)


def train_step_timing(ours: JaxStepRunner, runners: Mapping[str, TorchStepRunner], *, steps: int, block_steps: int,
                      check_steps: int, candidates: Sequence[int]) -> dict[str, Any]:
    """Checks, probes and times train steps (see the module docstring); every side takes the same steps.

    First `check_steps` untimed steps on every side (from the same weights on the same batches: also the
    warm-up); with several thread `candidates`, `probe_torch_threads` (one block per count; ours takes as many
    untimed steps) and torch set to the count whose fastest side was fastest (else to the one candidate); then
    `steps // block_steps` rounds of `timed_interleaved` blocks. Returns `check` (losses per side), `probe`,
    `threads`, `per_step` (seconds per step of each timed block, per side), `busy` and `final` (each side's loss
    at its last step).
    """
    import torch

    check = {"ours": [float(x) for x in jax.device_get(ours.run(check_steps))]}
    check |= {impl: [float(x) for x in runner.run(check_steps)] for impl, runner in runners.items()}
    probe: dict[int, dict[str, float]] = {}
    if len(candidates) > 1:
        probe = probe_torch_threads(runners, candidates, block_steps)
        ours.run(block_steps * len(candidates))
    threads = min(probe, key=lambda n: min(probe[n].values())) if probe else candidates[0]
    torch.set_num_threads(threads)

    fns: dict[str, Callable[[], Any]] = {"ours": functools.partial(ours.run, block_steps)}
    fns |= {impl: functools.partial(runner.run, block_steps) for impl, runner in runners.items()}
    block_times, busy = timed_interleaved(fns, steps // block_steps)
    if any(runner.steps_done != ours.steps_done for runner in runners.values()):
        raise AssertionError(f"the sides took different numbers of steps: ours {ours.steps_done}, torch "
                             f"{ {impl: r.steps_done for impl, r in runners.items()} }")
    final = {"ours": float(jax.device_get(ours.last_metrics["loss"]))}
    final |= {impl: float(runner.last_loss) for impl, runner in runners.items()}
    per_step = {name: [t / block_steps for t in ts] for name, ts in block_times.items()}
    return {"check": check, "probe": probe, "threads": threads, "per_step": per_step, "busy": busy, "final": final}


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
