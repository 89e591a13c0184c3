"""The optimizer every task trains with: global-norm clipping, then AdamW on a warmup + cosine schedule.

Weight decay applies to arrays with ndim >= 2 (kernels, embeddings): biases, norm scales and scalars such as
SigLIP's temperature and bias are not decayed. `config` is the `optimizer` section of an experiment config.

Freezing: `trainable_mask(params, patterns)` marks the parameters whose '/'-joined name matches one of the
regexes (`re.search`, e.g. "llm/layers/attn" or "lora_"); `make_optimizer(..., trainable=mask)` then gives the
frozen ones no optimizer state at all (not zero-filled moments: `optax.multi_transform` keeps none) and a zero
update, and clipping measures the trainable gradients only.
"""

import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from big_vision_lite.utils.trees import path_name

OPTIMIZER_KEYS = ("lr", "warmup_steps", "end_lr_fraction", "weight_decay", "b1", "b2", "clip_norm")


def check_optimizer_config(config: ml_collections.ConfigDict, total_steps: int) -> None:
    """Refuses settings that would silently train badly, naming the key and its allowed range."""
    missing = [k for k in OPTIMIZER_KEYS if k not in config]
    if missing:
        raise ValueError(f"config.optimizer lacks {', '.join(missing)}")
    if not config.lr > 0:
        raise ValueError(f"optimizer.lr must be > 0, got {config.lr}")
    if not isinstance(config.warmup_steps, int) or config.warmup_steps < 0:
        raise ValueError(f"optimizer.warmup_steps must be an int >= 0, got {config.warmup_steps!r}")
    if config.warmup_steps >= total_steps:
        warnings.warn(f"optimizer.warmup_steps {config.warmup_steps} >= total_steps {total_steps}: the learning rate "
                      f"warms up over the first {warmup_steps(config, total_steps)} steps instead", stacklevel=3)
    if not 0 <= config.end_lr_fraction <= 1:
        raise ValueError(f"optimizer.end_lr_fraction must be in [0, 1], got {config.end_lr_fraction}")
    for key in ("b1", "b2"):
        if not 0 <= config[key] < 1:
            raise ValueError(f"optimizer.{key} must be in [0, 1), got {config[key]}")
    if config.clip_norm is not None and not config.clip_norm > 0:
        raise ValueError(f"optimizer.clip_norm must be > 0 or None, got {config.clip_norm}")


def warmup_steps(config: ml_collections.ConfigDict, total_steps: int) -> int:
    """The warmup's length: `optimizer.warmup_steps`, cut to end before the last step in a shorter run (a
    `--set total_steps=2` smoke run of a config made for thousands of steps)."""
    return min(config.warmup_steps, max(total_steps - 1, 0))


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * end_lr_fraction` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup_steps(config, total_steps), decay_steps=total_steps,
        end_value=config.lr * config.end_lr_fraction)


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def trainable_mask(params: Any, patterns: Sequence[str] | None) -> Any:
    """A bool per leaf of `params`: its name matches one of `patterns` (all True when `patterns` is None).

    Every pattern must match some parameter (a typo would otherwise silently freeze everything it meant to
    train), and at least one parameter must be trainable.
    """
    names = [path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    if patterns is None:
        return jax.tree.map(lambda _: True, params)
    if isinstance(patterns, str):
        raise ValueError(f"trainable must be a list of regexes, got the string {patterns!r}; write [{patterns!r}]")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"trainable pattern {pattern!r} is not a valid regex: {e}") from None
    for pattern, regex in zip(patterns, compiled, strict=True):
        if not any(regex.search(name) for name in names):
            raise ValueError(f"trainable pattern {pattern!r} matches no parameter; names look like "
                             f"{names[:3] + names[-2:]}")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(regex.search(path_name(path)) for regex in compiled), params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   trainable: Any | None = None) -> optax.GradientTransformation:
    """Clipping + AdamW; with a `trainable` mask (see `trainable_mask`) frozen leaves get no state and no update."""
    check_optimizer_config(config, total_steps)
    steps = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm is not None else []
    steps.append(optax.adamw(make_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                             weight_decay=config.weight_decay, mask=_decay_mask))
    optimizer = optax.chain(*steps)
    if trainable is None:
        return optimizer
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
