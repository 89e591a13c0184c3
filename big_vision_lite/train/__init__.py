"""Training: one loop (loop.py) shared by every task; a task is chosen by `config.task`."""

from typing import Any


def task_factory(name: str) -> Any:
    """The Task class of `config.task` (imported lazily: each pulls in its own model and data code)."""
    if name == "siglip":
        from big_vision_lite.train.siglip import SiglipTask
        return SiglipTask
    if name == "paligemma":
        from big_vision_lite.train.paligemma import PaliGemmaTask
        return PaliGemmaTask
    raise ValueError(f"config.task must be one of: siglip, paligemma; got {name!r}")
