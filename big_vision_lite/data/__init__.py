"""Training data: a generated shapes dataset, image-caption folders and tar shards, a grain batch pipeline, and a
caption tokenizer.

    spec = ShapesSpec(image_size=32)
    tok = train_caption_tokenizer(all_captions(spec), ckpt_dir)
    loader = make_train_loader(shapes_source(spec, "train"), batch_size=256, image_size=32, tokenizer=tok,
                               max_len=16, seed=0, start_step=step)
    batch = next(loader)  # image float32 [B, S, S, 3] in [-1, 1], text int32 [B, L], skipped int32 []

See `pipeline` for the batch format, determinism and how unreadable images are skipped and counted.
"""

from big_vision_lite.data.pipeline import Loader, decode_image, make_eval_batches, make_train_loader
from big_vision_lite.data.processor import PaliGemmaProcessor
from big_vision_lite.data.shapes import (
    ShapesSource,
    ShapesSpec,
    all_captions,
    held_out_combinations,
    held_out_pairs,
    shapes_batch,
    shapes_example,
    shapes_source,
)
from big_vision_lite.data.sources import CaptionFileSource, TarShardSource, folder_source, open_source, tar_source
from big_vision_lite.data.text import tokenize_fixed, train_caption_tokenizer

__all__ = [
    "CaptionFileSource",
    "Loader",
    "PaliGemmaProcessor",
    "ShapesSource",
    "ShapesSpec",
    "TarShardSource",
    "all_captions",
    "decode_image",
    "folder_source",
    "held_out_combinations",
    "held_out_pairs",
    "make_eval_batches",
    "make_train_loader",
    "open_source",
    "shapes_batch",
    "shapes_example",
    "shapes_source",
    "tar_source",
    "tokenize_fixed",
    "train_caption_tokenizer",
]
