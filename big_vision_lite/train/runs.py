"""Runs that depend on other runs: a task names the finished runs it needs (`Requirement`), the loop trains them.

PaliGemma's vision tower starts from a SigLIP run, so its task requires that run; `train` trains a required run
that has not finished (or resumes it) before it builds the task, and the task then only reads it.
"""

import dataclasses
from pathlib import Path

from big_vision_lite.utils.paths import cache_dir


@dataclasses.dataclass(frozen=True)
class Requirement:
    """A run that must have finished before a task starts: its config spec (`NAME[:ARG]` or a path), its workdir,
    and why it is needed (printed when it is trained first)."""

    config: str
    workdir: Path
    why: str


def default_workdir(config: str) -> Path:
    """Where a required run of `config` lives unless the config names a workdir: shared between runs in the cache
    directory (`runs/siglip_shapes_smoke` for "siglip_shapes:smoke")."""
    name, _, arg = config.partition(":")
    return cache_dir() / "runs" / (Path(name).stem + (f"_{arg}" if arg else ""))
