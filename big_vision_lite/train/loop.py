"""The training loop every task shares: sharded state, a jitted donated step, checkpoints, metrics, resume.

A task (SigLIP, PaliGemma; `config.task` names it) supplies only what differs: the finished runs it needs first,
how to build and initialise its parameters, its loss and gradients for one batch, its data from a given step on,
and its evaluation. Everything else lives here once:

* `prepare(config, workdir)` builds what a run needs before its first step (mesh, task, optimizer, shardings, the
  jitted step from `build_train_step`): `train` runs it, and the train-step benchmarks time that very step;
* the runs a task `requires` are trained (or resumed) first when they have not finished;
* state = {step, params, opt_state, rng}, placed on a `data x fsdp` mesh by the config's sharding rules;
* `config.trainable` (optional regexes over parameter names) freezes the rest: no optimizer state, no update;
* `train_step(state, batch) -> (state, metrics)` jitted with the state donated, compiled ahead of the first step
  (its compile time is reported apart from examples/s);
* the step's RNG is `fold_in(rng, step)`, and the data position is the step, so a resumed run sees exactly the
  batches and randomness an uninterrupted one would;
* checkpoints every `ckpt_every` steps and at the end (orbax, last `keep_ckpts` kept); re-running the same
  command resumes from the newest readable checkpoint; resuming with a config that differs from the run's saved
  `config.json` is refused with the list of changes, unless `allow_config_change` (the old config is then kept
  as `config.until-step-<N>.json`);
* one process per workdir: a run holds the workdir's lock (`utils/locks.py`) and a second one is refused with
  the holder's process id; a required run shared between runs is trained under its lock, the others waiting;
* several processes (`train/distributed.py`, `bvl launch`) run the same loop on one global mesh: each builds only
  its rows of every global batch, all save and restore the checkpoints together (orbax), every decision about the
  workdir (its lock, its config, a corrupt checkpoint) is taken on process 0 for the group, and process 0 alone
  writes metrics, plots, records and the progress bar;
* metrics are fetched from the device only at log, eval and checkpoint steps; a non-finite loss or gradient
  norm among them stops the run before anything after it is saved, so the last checkpoint is a good one.
"""

import contextlib
import ctypes
import dataclasses
import functools
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from big_vision_lite.checkpoints.run import CONFIG_FILE, RunInfo, latest_step, read_saved_config, write_run_info
from big_vision_lite.train.checkpoint import Checkpointer
from big_vision_lite.train.config import ConfigError, config_changes
from big_vision_lite.train.distributed import (
    host_copy,
    is_main_process,
    main_process_first,
    on_main_process,
    process_rows,
)
from big_vision_lite.train.metrics import CURVES_FILE, MetricsLog, plot_curves
from big_vision_lite.train.optimizer import make_optimizer, make_schedule, trainable_mask
from big_vision_lite.train.runs import Requirement
from big_vision_lite.train.sharding import batch_sharding, make_mesh, shard_batch, tree_shardings
from big_vision_lite.train.tasks import task_class
from big_vision_lite.utils.atomic import write_text_atomic
from big_vision_lite.utils.locks import folder_lock

LOOP_KEYS = ("task", "seed", "total_steps", "batch_size", "log_every", "eval_every", "ckpt_every", "keep_ckpts")
RESULT_FILE = "result.json"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or inf; the run stopped without saving past it."""


class Task(Protocol):
    """What a model family brings to the shared loop; built as `Task(config, workdir, mesh)`."""

    eval_keys: tuple[str, ...]  # metric names `evaluate` returns, plotted at the end

    @staticmethod
    def requires(config: ml_collections.ConfigDict) -> tuple[Requirement, ...]:
        """The runs that must have finished before the task is built (trained first by `train`)."""

    def init_params(self, rng: jax.Array) -> Any:
        """Fresh parameters (traced under jit: no side effects)."""

    def train_grads(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
        """(loss, metrics, gradients w.r.t. params) for one global batch (traced under jit)."""

    def batches(self, start_step: int, rows: tuple[int, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Host batches, the first one the batch of `start_step`: rows lo..hi-1 of each global batch (`rows`, this
        process's share), or all of it."""

    def evaluate(self, params: Any) -> dict[str, float]:
        """Held-out metrics of `params` (on this process's devices; with several processes each computes its share
        and gathers the rest with `distributed.gather_objects`, so every process returns the same metrics)."""

    def report(self) -> dict[str, Any]:
        """End-of-run facts about the data (e.g. images skipped as unreadable)."""

    def run_info(self) -> RunInfo | None:
        """What `model.json` records (the loop writes it once the run's state is restored or created), or None."""


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    start_step: int  # 0 for a fresh run, the restored checkpoint's step on resume
    final_step: int
    final_eval: dict[str, float]
    compile_s: float
    train_s: float
    examples_per_s: float
    data_report: dict[str, Any]


def check_loop_config(config: ml_collections.ConfigDict) -> None:
    missing = [k for k in LOOP_KEYS if k not in config]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)}")
    task_class(config.task)  # refuses an unknown task before anything is built
    # The step counter is int32 on the device; PRNGKey takes a uint32 seed (larger ones silently wrap).
    for key, low, high in [*((k, 1, 2**31 - 1) for k in ("total_steps", "batch_size", "log_every", "eval_every",
                                                          "ckpt_every", "keep_ckpts")), ("seed", 0, 2**32 - 1)]:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"config.{key} must be an int in [{low}, {high}], got {value!r}")


def reuse_freed_host_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of handing it back to the kernel; True if it did.

    XLA:CPU allocates an executable's temporary buffer (all its intermediates, 251 MiB for the SigLIP shapes train
    step) afresh on every call. glibc serves any request above 32 MiB from a thread's arena with a new mmap and
    unmaps it on free, so every step page-faulted the whole buffer in again and the kernel zeroed it: a third of
    the step's CPU time was `sys`. With one arena, no mmap and no trimming, the buffer comes from the heap and the
    next step reuses the same pages (the step ran ~1.4x faster). The cost: the heap keeps its peak size. Process
    wide, and threads keep the arena they already use, so call it before JAX starts its CPU client. A no-op on
    other C libraries.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def new_train_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> dict[str, Any]:
    """The state `build_train_step` steps: {step, params, opt_state, rng}."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params), "rng": rng}


def build_train_step(task: Task, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                     trainable: Any | None = None) -> Callable[[dict[str, Any], dict[str, jax.Array]],
                                                               tuple[dict[str, Any], dict[str, jax.Array]]]:
    """`train_step(state, batch) -> (state, metrics)`: the task's gradients, then clipping + AdamW (`optimizer`),
    frozen parameters (`trainable` False) getting zero gradients. Not jitted: `prepare` jits it with shardings."""
    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, Any]]:
        rng = jax.random.fold_in(state["rng"], state["step"])  # a function of the step: resumes reproduce it
        loss, metrics, grads = task.train_grads(state["params"], batch, rng)
        if trainable is not None:
            # Zeros instead of the frozen gradients: XLA then drops the backward pass that only they needed (a
            # frozen vision tower is not back-propagated), and grad_norm is the trained parameters' norm.
            grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, lr=schedule(state["step"]), grad_norm=optax.tree.norm(grads))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics
    return train_step


@dataclasses.dataclass
class Trainer:
    """What `prepare` builds: the run's mesh and task, its optimizer, the state's shardings, and `step`, the jitted
    train step (state donated) that `train` runs and the benchmarks time."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    task: Task
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shape: Any  # shapes and dtypes of the state (jax.ShapeDtypeStruct leaves)
    state_shardings: Any
    init_rng: jax.Array  # the parameters' initialisation
    loop_rng: jax.Array  # the state's rng, folded with the step for every step
    step: Callable[[dict[str, Any], dict[str, jax.Array]], tuple[dict[str, Any], dict[str, jax.Array]]]

    def new_state(self, params: Any) -> dict[str, Any]:
        """A fresh state holding `params`, placed by the sharding rules."""
        fn = functools.partial(new_train_state, optimizer=self.optimizer, rng=self.loop_rng)
        return jax.jit(fn, out_shardings=self.state_shardings)(params)

    def init_state(self) -> dict[str, Any]:
        """A fresh state with the task's initial parameters, built directly in its shardings."""
        fn = lambda rng: new_train_state(self.task.init_params(rng), self.optimizer, self.loop_rng)  # noqa: E731
        return jax.jit(fn, out_shardings=self.state_shardings)(self.init_rng)

    def abstract_state(self) -> Any:
        """Shapes, dtypes and shardings of the state (what a checkpoint restores into)."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self.state_shape,
                            self.state_shardings)


def prepare(config: ml_collections.ConfigDict, workdir: str | Path) -> Trainer:
    """Everything a run needs before its first step; the runs its task requires must have finished."""
    check_loop_config(config)
    reuse_freed_host_memory()  # before make_mesh starts JAX's CPU client
    mesh = make_mesh(**config.mesh.to_dict())
    if config.batch_size % mesh.devices.size:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {mesh.devices.size} devices")
    with main_process_first("building the task"):  # it may write the run's tokenizer: once, by process 0
        task = task_class(config.task)(config, workdir, mesh)
    init_rng, loop_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    patterns = config.get("trainable")
    trainable = None if patterns is None else trainable_mask(jax.eval_shape(task.init_params, init_rng), patterns)
    optimizer = make_optimizer(config.optimizer, config.total_steps, trainable)
    schedule = make_schedule(config.optimizer, config.total_steps)
    rules = [tuple(rule) for rule in config.sharding_rules]
    state_shape = jax.eval_shape(lambda rng: new_train_state(task.init_params(rng), optimizer, loop_rng), init_rng)
    shardings = tree_shardings(state_shape, mesh, rules)
    # Metrics replicated: every process reads them whole (a NaN stops all of them at the same step).
    step = jax.jit(build_train_step(task, optimizer, schedule, trainable),
                   in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, NamedSharding(mesh, P())),
                   donate_argnums=0)
    return Trainer(config, mesh, task, optimizer, schedule, state_shape, shardings, init_rng, loop_rng, step)


def train_requirements(config: ml_collections.ConfigDict, *, progress: bool = True) -> None:
    """Trains (or resumes) every run `config`'s task requires that has not finished. Each is checked and trained
    under its workdir's lock, so runs started together that need the same one train it once: the others wait and
    then find it finished."""
    for requirement in task_class(config.task).requires(config):
        with group_lock(requirement.workdir, what="required run", wait=True):
            if not on_main_process("checking a required run", requirement.finished):
                if is_main_process():
                    print(f"{requirement.why}: training {requirement.config} in {requirement.workdir} first")
                required = requirement.load_config()
                check_loop_config(required)
                allow = f"`bvl train {requirement.config} --workdir {requirement.workdir} --allow-config-change`"
                changes = on_main_process("checking a required run's config", _check_resumed_config, required,
                                          requirement.workdir, False, allow)
                train_requirements(required, progress=progress)
                _train_locked(required, requirement.workdir, changes, stop_at=None, progress=progress)


@contextlib.contextmanager
def group_lock(workdir: Path, *, what: str = "workdir", wait: bool = False) -> Iterator[None]:
    """The workdir's lock (`folder_lock`) for a whole process group: held by process 0 for all of them; a refusal
    (another run holds it) stops every process."""
    with contextlib.ExitStack() as held:
        on_main_process(f"locking {what} {workdir}",
                        lambda: bool(held.enter_context(folder_lock(workdir, what=what, wait=wait))))
        yield


def _check_resumed_config(config: ml_collections.ConfigDict, workdir: Path, allow_config_change: bool,
                          how_to_allow: str = "--allow-config-change") -> tuple[int, list[str]] | None:
    """Refuses to resume a run with another config than its saved one (see `config_changes`) unless allowed
    (`how_to_allow` says how, in the message); returns (the latest step, the changes) of an allowed change, None
    when nothing changes."""
    saved = read_saved_config(workdir)
    step = latest_step(workdir)
    if saved is None or step is None:
        return None
    changes = config_changes(saved, config)
    if not changes:
        return None
    if not allow_config_change:
        raise ConfigError(f"workdir {workdir} holds a run (step {step}) of another config; resuming would change "
                          f"{'; '.join(changes)}. Train in a new workdir, or resume with these changes with "
                          f"{how_to_allow}")
    return step, changes


def _record_run(config: ml_collections.ConfigDict, workdir: Path, changes: tuple[int, list[str]] | None,
                task: Task) -> None:
    """Writes `config` as the run's config.json and the task's model.json; an allowed change first keeps the old
    config beside it (`config.until-step-<N>.json`)."""
    if changes is not None:
        step, _ = changes
        kept, copies = workdir / f"config.until-step-{step}.json", 1
        while kept.exists():  # changed twice at one step: keep every config
            kept, copies = workdir / f"config.until-step-{step}.{copies}.json", copies + 1
        write_text_atomic(kept, (workdir / CONFIG_FILE).read_text(encoding="utf-8"))
    write_text_atomic(workdir / CONFIG_FILE, config.to_json_best_effort(indent=2) + "\n")
    if (info := task.run_info()) is not None:
        write_run_info(workdir, info)


class _PendingMetrics:
    """Per-step metrics left on the device until a log, eval or checkpoint step needs them."""

    def __init__(self) -> None:
        self.items: list[tuple[int, dict[str, jax.Array]]] = []

    def fetch(self) -> list[tuple[int, dict[str, float]]]:
        fetched = jax.device_get(self.items)
        self.items = []
        for step, metrics in fetched:
            for key in ("loss", "grad_norm"):
                if not np.isfinite(metrics[key]):
                    raise NonFiniteLossError(f"{key} is {metrics[key]} at step {step}")
        return [(step, {k: float(v) for k, v in metrics.items()}) for step, metrics in fetched]


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, stop_at: int | None = None,
          progress: bool = True, allow_config_change: bool = False) -> TrainResult:
    """Trains (or resumes) `config` in `workdir` until `total_steps` (or `stop_at`, for notebooks and tests),
    after the runs its task requires. The workdir is locked for the whole run."""
    check_loop_config(config)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir {workdir} is a file, expected a folder")
    with group_lock(workdir):
        changes = on_main_process("checking the workdir's config", _check_resumed_config, config, workdir,
                                  allow_config_change)  # before any required run trains
        train_requirements(config, progress=progress)
        return _train_locked(config, workdir, changes, stop_at=stop_at, progress=progress)


def _train_locked(config: ml_collections.ConfigDict, workdir: Path, changes: tuple[int, list[str]] | None, *,
                  stop_at: int | None, progress: bool) -> TrainResult:
    """`train` once the workdir's lock is held, its config checked (`changes`: an allowed change, or None) and the
    required runs finished."""
    trainer = prepare(config, workdir)
    task = trainer.task

    checkpointer = Checkpointer(workdir, config.ckpt_every, config.keep_ckpts)
    restored = checkpointer.restore_latest(trainer.abstract_state())
    if restored is None:
        start_step, state = 0, trainer.init_state()
    else:
        start_step, state, meta = restored
        if meta.get("data_position") != start_step:
            raise ValueError(f"checkpoint {start_step}: data_position {meta.get('data_position')} != its step")
    # Only now, with the state known to fit this config, does the workdir say it holds this config's run; after an
    # allowed change, only once a checkpoint trained with it is on disk (a run that fails before that, e.g. on
    # NaN, leaves the workdir describing its checkpoints as they are).
    record_run: Callable[[], None] | None = functools.partial(_record_run, config, workdir, changes, task)
    main = is_main_process()  # writes the run's files (metrics, plots, records); every process trains and saves
    if changes is None:
        if main:
            record_run()
        record_run = None
    elif main:
        warnings.warn(f"resuming {workdir} at step {changes[0]} with a changed config ({'; '.join(changes[1])}); "
                      "the old config is kept beside it once the first checkpoint of this one is saved", stacklevel=3)
    last_step = min(config.total_steps, stop_at or config.total_steps)
    log = MetricsLog(workdir, start_step) if main else None
    pending = _PendingMetrics()

    mesh = trainer.mesh
    batches = task.batches(start_step, process_rows(config.batch_size))  # this process's rows of each batch
    final_eval: dict[str, float] = {}
    compile_s = train_s = 0.0
    examples = 0
    bar = tqdm(total=config.total_steps, initial=start_step, desc="train", disable=not (progress and main),
               dynamic_ncols=True)
    try:
        step = start_step
        compiled = None
        interval_start, interval_steps = time.perf_counter(), 0
        while step < last_step:
            batch = shard_batch(next(batches), mesh)
            if compiled is None:
                t0 = time.perf_counter()
                compiled = trainer.step.lower(state, batch).compile()
                compile_s = time.perf_counter() - t0
                interval_start = time.perf_counter()
            state, metrics = compiled(state, batch)
            step += 1
            interval_steps += 1
            pending.items.append((step, metrics))
            is_log = step % config.log_every == 0 or step == last_step
            is_eval = step % config.eval_every == 0 or step == config.total_steps
            is_ckpt = checkpointer.due(step) or step == last_step
            if not (is_log or is_eval or is_ckpt):
                continue
            records = pending.fetch()  # raises on a non-finite loss before anything is saved
            elapsed = time.perf_counter() - interval_start
            train_s += elapsed
            examples += interval_steps * config.batch_size
            speed = interval_steps * config.batch_size / max(elapsed, 1e-9)
            if is_log and log is not None:
                record = {"step": step, **records[-1][1], "examples_per_s": speed}
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", ex_per_s=f"{speed:.0f}")
            bar.update(interval_steps)
            if is_eval:
                final_eval = _evaluate(task, state["params"])
                if log is not None:
                    log.write({"step": step, **final_eval})
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in final_eval.items()))
            if is_ckpt:
                checkpointer.save(step, state, {"step": step, "data_position": step})
                if record_run is not None:
                    checkpointer.wait()  # committed: from now on the workdir holds this config's run
                    if main:
                        record_run()
                    record_run = None
            interval_start, interval_steps = time.perf_counter(), 0
    except NonFiniteLossError as error:
        checkpointer.wait()
        steps = checkpointer.steps()
        kept = f"{checkpointer.directory / str(steps[-1])}" if steps else "none (no checkpoint was written yet)"
        raise NonFiniteLossError(f"{error}; stopping. Last good checkpoint: {kept}") from None
    finally:
        bar.close()
        if log is not None:
            log.close()
        checkpointer.close()
    if step == config.total_steps and not final_eval:  # a finished run, re-run: report its evaluation again
        final_eval = _evaluate(task, state["params"])
    if step == config.total_steps and log is not None:
        plot_curves(log.path, workdir / CURVES_FILE, task.eval_keys)
    result = TrainResult(workdir=workdir, start_step=start_step, final_step=step, final_eval=final_eval,
                         compile_s=compile_s, train_s=train_s, examples_per_s=examples / max(train_s, 1e-9),
                         data_report=task.report())
    if main:
        write_text_atomic(workdir / RESULT_FILE, json.dumps(dataclasses.asdict(result), default=str, indent=2) + "\n")
    return result


def _evaluate(task: Task, params: Any) -> dict[str, float]:
    """The task's evaluation of `params`. With several processes, each gets a whole host copy of them and the task
    evaluates its share of the examples on the process's own devices, every process getting the same numbers
    (process 0 logs them)."""
    return task.evaluate(host_copy(params) if jax.process_count() > 1 else params)
