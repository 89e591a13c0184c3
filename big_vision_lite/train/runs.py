"""Runs that depend on other runs: a task names the finished runs it needs (`Requirement`), the loop trains them.

PaliGemma's vision tower starts from a SigLIP run, so its task requires that run; `train` trains a required run
that has not finished (or resumes it) before it builds the task, and the task then only reads it.
"""

import dataclasses
from pathlib import Path

import ml_collections

from big_vision_lite.checkpoints.run import latest_step, read_saved_config
from big_vision_lite.train.config import load_config
from big_vision_lite.utils.paths import cache_dir


@dataclasses.dataclass(frozen=True)
class Requirement:
    """A run that must have finished before a task starts: its config spec (`NAME[:ARG]` or a path), its workdir,
    and why it is needed (printed when it is trained first)."""

    config: str
    workdir: Path
    why: str

    def load_config(self) -> ml_collections.ConfigDict:
        return load_config(self.config)

    def finished(self) -> bool:
        """Whether the workdir holds the final checkpoint (step `total_steps`) of the config it was trained with."""
        saved = read_saved_config(self.workdir)
        return saved is not None and latest_step(self.workdir) == saved.total_steps


def default_workdir(config: str) -> Path:
    """Where a required run of `config` lives unless the config names a workdir: shared between runs in the cache
    directory (`runs/siglip_shapes_smoke` for "siglip_shapes:smoke")."""
    name, _, arg = config.partition(":")
    return cache_dir() / "runs" / (Path(name).stem + (f"_{arg}" if arg else ""))
