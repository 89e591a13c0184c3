"""What the tasks share: their data sources by `config.data`, and the run's caption tokenizer."""

import shutil
from pathlib import Path
from typing import Any

import ml_collections

from big_vision_lite.checkpoints.run import TOKENIZER_DIR
from big_vision_lite.checkpoints.tokenizer import (
    SENTENCEPIECE_FILE,
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    Tokenizer,
    load_tokenizer,
)
from big_vision_lite.data.shapes import ShapesSpec, shapes_source
from big_vision_lite.data.sources import folder_source, tar_source
from big_vision_lite.data.text import train_caption_tokenizer
from big_vision_lite.utils.atomic import atomic_folder


def make_sources(data: ml_collections.ConfigDict) -> tuple[Any, Any, Any | None]:
    """(train source, held-out evaluation source, distractor source or None) of `config.data`.

    Distractors only widen the candidate sets of retrieval. For the shapes data they are one image per trained
    attribute combination, so a held-out image competes with every caption the generator can write, including
    its colour with a trained shape: retrieval then fails unless the shape is read, not just the colour.
    """
    if data.name == "shapes":
        spec = ShapesSpec(image_size=data.image_size, seed=data.seed, holdout_fraction=data.holdout_fraction,
                          colours=tuple(data.colours), shapes=tuple(data.shapes))
        return shapes_source(spec, "train"), shapes_source(spec, "test"), shapes_source(spec, "gallery")
    if data.name in ("folder", "tar"):
        make = folder_source if data.name == "folder" else tar_source
        if not data.get("path") or not data.get("eval_path"):
            raise ValueError(f"data.name={data.name!r} needs data.path and data.eval_path (the held-out split)")
        return make(data.path), make(data.eval_path), None
    raise ValueError(f"data.name must be shapes, folder or tar, got {data.name!r}")


def caption_tokenizer(config: ml_collections.ConfigDict, workdir: Path, train_source: Any) -> Tokenizer:
    """The run's tokenizer: the one saved in `workdir` (resume), a given one, or one trained on the captions."""
    saved = workdir / TOKENIZER_DIR
    if saved.is_dir():
        return load_tokenizer(str(saved))
    if config.text.tokenizer:
        load_tokenizer(config.text.tokenizer)  # refuse an unreadable one before copying it
        source = Path(config.text.tokenizer)
        with atomic_folder(saved) as tmp:
            if source.is_dir():
                for name in TOKENIZER_FILES:
                    if (source / name).is_file():
                        shutil.copy2(source / name, tmp / name)
            else:
                shutil.copy2(source, tmp / (TOKENIZER_FILE if source.suffix == ".json" else SENTENCEPIECE_FILE))
        return load_tokenizer(str(saved))
    return train_caption_tokenizer(train_source.captions(), saved, vocab_size=config.text.vocab_size)
