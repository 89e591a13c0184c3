"""A training workdir of ours, as a checkpoint: what `bvl train` writes there and how it is read back.

    W/config.json          the experiment config the run was started with (ml_collections JSON)
    W/model.json           the model: its kind, its config as a dict and the module settings it trained with
    W/tokenizer/           the run's tokenizer (HF files)
    W/checkpoints/<step>/  orbax checkpoints of the training state {step, params, opt_state, rng}

The training loop (train/) writes these; `load_params` and `read_run_info` read them for `checkpoints.load`,
notebooks and warm starts, whatever mesh wrote them.

A checkpoint that fails to restore is *proven corrupt* only when every one of its files reads back (no I/O error)
and the failure itself says the content is damaged or incomplete: tensorstore's DATA_LOSS or NOT_FOUND, a JSON
file that does not parse, a missing file. Reading it again cannot help. Any other failure (a disk or network
read error, a permission fault, tensorstore's UNAVAILABLE, an out-of-memory error) may pass: nothing may be set
aside or skipped for it, and `CheckpointReadError` says so.
"""

import dataclasses
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from big_vision_lite.checkpoints.files import CheckpointError
from big_vision_lite.utils.atomic import write_text_atomic
from big_vision_lite.utils.trees import path_name

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
RUN_KINDS = ("siglip", "paligemma")


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What `model.json` holds: the model kind, its config dict (`paligemma_config_to_dict` or the two-tower
    `dataclasses.asdict`), the module settings the run trained with (compute and parameter dtypes by name), and
    (PaliGemma) the training prompt."""

    kind: str
    model: dict[str, Any]
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str | None = None
    prompt: str | None = None

    def __post_init__(self):
        if self.kind not in RUN_KINDS:
            raise ValueError(f"run kind {self.kind!r} is not one of {RUN_KINDS}")


def is_run(path: str | Path) -> bool:
    """Whether `path` is a training workdir that describes its model (model.json)."""
    return (Path(path) / MODEL_FILE).is_file()


def is_unrecorded_run(path: str | Path) -> bool:
    """Whether `path` is a training workdir written before runs recorded their model: checkpoints and the
    experiment config (which names a task), but no model.json."""
    path = Path(path)
    if is_run(path) or not (path / CHECKPOINT_DIR).is_dir() or not (path / CONFIG_FILE).is_file():
        return False
    try:
        return "task" in json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except ValueError:
        return False


def write_run_info(workdir: str | Path, info: RunInfo) -> Path:
    return write_text_atomic(Path(workdir) / MODEL_FILE, json.dumps(dataclasses.asdict(info), indent=2) + "\n")


def read_run_info(workdir: str | Path) -> RunInfo:
    """The RunInfo of a workdir; runs written before model.json named its kind (PaliGemma's, with `scan`) read too."""
    path = Path(workdir) / MODEL_FILE
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None
    if "kind" not in fields:  # the first PaliGemma runs: {"model", "dtype", "scan", "prompt"}
        fields = {"kind": "paligemma", "scan_layers": fields.pop("scan", False), **fields}
    known = {f.name for f in dataclasses.fields(RunInfo)}
    try:
        return RunInfo(**{k: v for k, v in fields.items() if k in known})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _manager(directory: Path) -> ocp.CheckpointManager:
    """A manager that reads checkpoints in this process alone: in a multi-process run orbax would otherwise make
    every process of the group meet at its barriers, and a read that one process does by itself would wait forever."""
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                               barrier_sync_key_prefix=f"read-{me}")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False,
                                                                                 multiprocessing_options=alone),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


def saved_state_shapes(workdir: str | Path, step: int) -> dict[str, tuple[int, ...]] | None:
    """Leaf path -> shape of the state saved at `step` (from the checkpoint's metadata), None if unreadable."""
    manager = _manager(Path(workdir).absolute() / CHECKPOINT_DIR)
    try:
        metadata = manager.item_metadata(step)["state"]
        return {path_name(path): tuple(m.shape) for path, m in jax.tree_util.tree_leaves_with_path(metadata)}
    except Exception:  # unreadable metadata: the checkpoint is corrupt, which the caller finds out on restore
        return None
    finally:
        manager.close()


def latest_step(workdir: str | Path) -> int | None:
    """The step of the newest complete checkpoint in a workdir, None when it holds none."""
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    manager = _manager(directory)
    try:
        return manager.latest_step()
    finally:
        manager.close()


class CheckpointReadError(CheckpointError):
    """A checkpoint that failed to restore for a reason other than its content (an I/O error): nothing was moved."""


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# tensorstore's status codes (the start of its ValueError messages) for data that is damaged or absent.
CORRUPTION_STATUSES = ("DATA_LOSS", "NOT_FOUND")


def _raise(error: OSError) -> None:
    raise error


def _unreadable_file(step_dir: Path) -> tuple[Path, OSError] | None:
    """The first file (or folder) of a checkpoint that cannot be read to its end, with the error."""
    try:
        walk = list(os.walk(step_dir, onerror=_raise))  # a folder that cannot be listed raises, not skipped
    except OSError as error:
        return Path(error.filename or step_dir), error
    for folder, _, names in walk:
        for name in sorted(names):
            path = Path(folder) / name
            try:
                with path.open("rb") as f:
                    while f.read(1 << 24):
                        pass
            except OSError as error:
                return path, error
    return None


def check_restore_failure(step_dir: Path, error: Exception) -> str:
    """Why the checkpoint at `step_dir` failed to restore with `error`, when that proves it corrupt (see the module
    docstring); raises CheckpointReadError when it does not."""
    unreadable = _unreadable_file(step_dir)
    if unreadable is not None:
        path, read_error = unreadable
        raise CheckpointReadError(f"checkpoint {step_dir}: {path} cannot be read ({read_error.strerror or read_error})"
                                  "; a read error is not proof of corruption, so nothing was moved. Fix the storage "
                                  "and run again")
    for cause in _error_chain(error):
        damaged = isinstance(cause, json.JSONDecodeError | FileNotFoundError) or (
            type(cause) is ValueError and str(cause).startswith(CORRUPTION_STATUSES))
        if damaged:
            return f"{type(cause).__name__}: {str(cause)[:200]}"
    raise CheckpointReadError(f"checkpoint {step_dir}: restoring failed ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:200]}), which does not prove it corrupt (damaged or "
                              "missing data would); it may pass, so nothing was moved. Run again once the cause is "
                              "fixed")


def read_saved_config(workdir: str | Path) -> ml_collections.ConfigDict | None:
    """The experiment config a run in `workdir` was started with (its config.json), None when there is none."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as a JSON config ({e})") from None


def load_params(workdir: str | Path) -> tuple[int, Any]:
    """(step, params as numpy) of the newest restorable checkpoint in a training workdir, on the host, whatever
    mesh wrote it. A checkpoint proven corrupt is skipped with a warning (left in place: reading changes nothing
    on disk) and the previous one is read; any other failure raises."""
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints (train with `bvl train CONFIG --workdir {workdir}`)")
    manager = _manager(directory)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{directory}: no complete checkpoint")
        # Restore every array onto this process's first device: the writer's mesh may not exist here.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        for step in steps:
            try:
                metadata = manager.item_metadata(step)["state"]
                target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
                state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
                return step, jax.tree.map(np.asarray, state["params"])
            except Exception as error:  # classified: corrupt (skip it) or not (raise)
                why = check_restore_failure(directory / str(step), error)
                warnings.warn(f"checkpoint {directory / str(step)} cannot be restored ({why}); reading the previous "
                              "one", stacklevel=2)
        raise CheckpointError(f"{directory}: none of the checkpoints {sorted(steps)} can be restored")
    finally:
        manager.close()
