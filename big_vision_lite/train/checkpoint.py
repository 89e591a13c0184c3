"""Orbax checkpoints of a training state: every N steps, the last k kept, never a partial one as the latest.

A checkpoint is a folder `DIR/checkpoints/<step>` holding `state` (the pytree: params, optimizer state, step, RNG)
and `meta` (JSON: the data position and anything else the loop needs to resume). Orbax writes each one into a
temporary folder and renames it only once complete, so a crash (even `kill -9`) mid-write leaves the previous
checkpoint as the latest; leftover temporary folders are removed on the next start.

Every process of a multi-process run saves and restores its part of each checkpoint through orbax; whether a
checkpoint restored, and what to do when it did not, is decided once for the whole group (on process 0).

Restoring tries the latest step first. Only a checkpoint proven corrupt (`checkpoints.run.check_restore_failure`:
its files read back but their content does not restore, e.g. truncated or deleted tensor files) is moved to
`DIR/checkpoints_corrupt/<step>` with a warning, never deleted, and the previous one is tried. Any other failure
changes nothing on disk: a read error raises `CheckpointReadError`, and a checkpoint that reads fine but holds
another state than the config builds (another model or optimizer config) raises `StateMismatchError` naming what
differs.
"""

import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from big_vision_lite.checkpoints.files import CheckpointError
from big_vision_lite.checkpoints.run import CHECKPOINT_DIR, check_restore_failure, saved_state_shapes
from big_vision_lite.train.distributed import all_processes_agree, on_main_process
from big_vision_lite.utils.trees import path_name

CORRUPT_DIR = "checkpoints_corrupt"


class StateMismatchError(ValueError):
    """A readable checkpoint whose state differs from the one this config builds."""


class Checkpointer:
    """Saves a state pytree plus JSON metadata; restores the newest one that reads back."""

    def __init__(self, workdir: str | Path, every: int, keep: int):
        if every < 1:
            raise ValueError(f"ckpt_every must be >= 1, got {every}")
        if keep < 1:
            raise ValueError(f"keep_ckpts must be >= 1, got {keep}")
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINT_DIR
        self.every = every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the loop decides when; the manager must not skip a forced final save
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=True)  # training goes on while the previous checkpoint is written
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts writing (asynchronously); the previous save is finished first."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest readable checkpoint, or None when there is none.

        `abstract_state` gives the shapes, dtypes and shardings to restore into (jax.ShapeDtypeStruct leaves).
        When every checkpoint proves corrupt, all are set aside and CheckpointError says so: the run does not
        silently start again from step 0 (running again does, the history kept).
        """
        steps = on_main_process("listing the checkpoints", self.steps)  # one listing for the group
        for step in reversed(steps):
            restored, error = None, None
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                _check_same_structure(abstract_state, restored.state, step)
            except Exception as raised:  # set aside only when proven corrupt; anything else raises
                error = raised
            if all_processes_agree(error is None):  # every process read its part: one decision for all
                return step, restored.state, dict(restored.meta)
            # Judged on process 0, which moves the checkpoint aside or raises for every process.
            on_main_process(f"checking checkpoint {step}", self._set_aside_if_corrupt, step, abstract_state,
                            error or CheckpointError(f"checkpoint {step} restored here but not on another process"))
            self.manager.reload()
        if steps:
            raise CheckpointError(f"every checkpoint of {self.workdir} (steps {steps}) proved corrupt and was moved to "
                                  f"{self.workdir / CORRUPT_DIR}; run again to start this workdir from step 0 (its "
                                  "metrics are kept in metrics.superseded.jsonl)")
        return None

    def _set_aside_if_corrupt(self, step: int, abstract_state: Any, error: Exception) -> None:
        """Moves the checkpoint at `step` aside when `error` (its restore's) proves it corrupt; raises otherwise."""
        self._refuse_other_state(step, abstract_state)
        self._set_aside(step, check_restore_failure(self.directory / str(step), error))

    def _refuse_other_state(self, step: int, abstract_state: Any) -> None:
        """Raises StateMismatchError when the checkpoint at `step` is readable but holds another state."""
        saved = saved_state_shapes(self.workdir, step)
        if saved is None:
            return
        expected = {path_name(path): tuple(leaf.shape)
                    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
        if saved == expected:
            return
        differ = sorted(set(saved) ^ set(expected)) or sorted(k for k in saved if saved[k] != expected[k])
        raise StateMismatchError(
            f"checkpoint {self.directory / str(step)} holds another state than this config builds (first "
            f"differences: {differ[:3]}): it was written with another model or optimizer config. Resume with that "
            f"config, or train in a new workdir; nothing was moved")

    def _set_aside(self, step: int, why: str) -> None:
        source = self.directory / str(step)
        target = self.workdir / CORRUPT_DIR / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        copies = 1
        while target.exists():  # a step set aside before (and trained again since): keep both
            target = target.with_name(f"{step}.{copies}")
            copies += 1
        shutil.move(source, target)
        warnings.warn(f"checkpoint {source} cannot be restored ({why}); moved to {target}, falling back to the "
                      "previous checkpoint", stacklevel=3)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_same_structure(expected: Any, restored: Any, step: int) -> None:
    if jax.tree.structure(expected) != jax.tree.structure(restored):
        raise ValueError(f"checkpoint step {step} holds a different state structure than this config builds")
