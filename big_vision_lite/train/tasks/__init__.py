"""The training tasks, by the name `config.task` gives: what a model family brings to the one training loop.

    common.py     data sources by `config.data`, the run's caption tokenizer
    siglip.py     SigLIP: two towers, the sigmoid loss, zero-shot retrieval
    paligemma.py  PaliGemma: suffix-only cross-entropy, greedy captions (requires a finished SigLIP run)
"""

from big_vision_lite.train.tasks.paligemma import PaliGemmaTask
from big_vision_lite.train.tasks.siglip import SiglipTask

TASKS = {"siglip": SiglipTask, "paligemma": PaliGemmaTask}


def task_class(name: str) -> type:
    """The task class `config.task` names."""
    if name not in TASKS:
        raise ValueError(f"config.task must be one of: {', '.join(TASKS)}; got {name!r}")
    return TASKS[name]
