"""Where the package keeps what it builds once and reuses: converted models, tokenizers, shared training runs."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$BVL_CACHE_DIR` if set, else `~/.cache/big_vision_lite`."""
    env = os.environ.get("BVL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "big_vision_lite"
