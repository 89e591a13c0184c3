"""Names of pytree leaves: the '/'-joined paths that sharding rules, `trainable` patterns and checkpoint checks
match."""

from typing import Any


def path_name(path: tuple[Any, ...]) -> str:
    """'/'-joined parameter path, e.g. `img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel`."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)
