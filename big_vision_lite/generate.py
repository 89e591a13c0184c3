"""Text (and images) in, text out: the user-facing front end of the decoding engine.

`generate_text(MODEL, prompts)` continues text prompts with a decoder; `generate_image_text(MODEL, images,
prompts)` answers prompts about images with a PaliGemma (an HF folder with its tokenizer, or a training workdir
of ours) or a Gemma 3 with vision. Both load through `checkpoints.load`, tokenize, left-pad the prompts into one
batch, run `decoding.engine.generate` (one jitted decode loop), and report the completions with the timings: `load_s`,
`compile_s` (tracing + XLA compilation, from JAX's own compile events) and `run_s` (the rest of the generate call),
and `tokens_per_s` (new tokens of all rows / run_s).
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from big_vision_lite.checkpoints import Loaded, load
from big_vision_lite.data.gemma3_processor import BOI, Gemma3Processor
from big_vision_lite.data.processor import PaliGemmaProcessor
from big_vision_lite.decoding.engine import Generated, generate, left_pad
from big_vision_lite.decoding.samplers import SamplerConfig
from big_vision_lite.utils.timing import Timing, timed


def load_generator(model: str, kind: str, dtype: str | None, why: str) -> Loaded:
    """`load(model)` (unrolled layers: what the decode loop runs), refused unless it is a `kind` with a tokenizer
    that can pad a batch of prompts (a pad or an eos token)."""
    loaded = load(model, dtype)
    if loaded.kind != kind:
        raise ValueError(f"{model}: is a {loaded.kind} model; {why}")
    if loaded.tokenizer is None:
        raise ValueError(f"{model}: no tokenizer.json or tokenizer.model beside the weights; generating text needs "
                         f"the model's tokenizer")
    if loaded.tokenizer.pad_id is None:
        raise ValueError(f"{model}: the tokenizer in {loaded.tokenizer.source} has neither a pad nor an eos token; "
                         "a batch of prompts is padded with one (set pad_token or eos_token in "
                         "tokenizer_config.json)")
    return loaded


def generate_text(
    model: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    sampler: SamplerConfig | None = None,
    seed: int = 0,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Loads `model` (a packaged name or an HF decoder folder) and continues `prompts` as one batch; each row stops
    at its first end token. Returns the settings, the completions (text and ids) and the timings."""
    sampler = sampler or SamplerConfig()
    with timed() as load_time:
        loaded = load_generator(model, "decoder", dtype,
                                "text generation needs a decoder (give --image for a PaliGemma)")
    tokenizer = loaded.tokenizer
    tokens, mask = left_pad(tokenizer.encode_batch(prompts), tokenizer.pad_id)
    with timed() as run:
        result = generate(loaded.module, loaded.params, tokens, mask, max_new_tokens, sampler=sampler,
                          rng=jax.random.key(seed), end_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    completions = []
    for prompt, ids, length in zip(prompts, result.tokens, result.lengths, strict=True):
        ids = ids[:length].tolist()
        completions.append({"prompt": prompt, "completion": tokenizer.decode(ids), "tokens": ids,
                            "stopped_at_end": bool(length and ids[-1] in tokenizer.eos_ids)})
    return _report(model, loaded, sampler, seed, max_new_tokens, completions, result, load_time, run)


def generate_image_text(
    model: str,
    images: Sequence[str],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    sampler: SamplerConfig | None = None,
    seed: int = 0,
    dtype: str | None = None,
) -> dict[str, Any]:
    """PaliGemma or Gemma 3 with vision: continues each prompt about its image (image files; one for all prompts,
    or one each). Gemma 3 prompts become user turns of its chat template (unless they place "<start_of_image>"
    themselves) and stop at `<end_of_turn>`.

    Returns what `generate_text` returns, each completion also naming its image.
    """
    sampler = sampler or SamplerConfig()
    if len(images) not in (1, len(prompts)):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts: give one image, or one per prompt")
    pictures = []
    for path in images:
        if Path(path).exists() and not Path(path).is_file():  # a folder, or a FIFO that would block the read
            raise ValueError(f"image {path}: is not a regular file, expected an image file")
        try:
            with Image.open(path) as image:
                pictures.append(image.copy())
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # a bomb: more pixels than PIL's limit
            raise ValueError(f"image {path}: cannot be read ({e})") from None
    paths = list(images) * (len(prompts) // len(images))
    pictures *= len(prompts) // len(pictures)
    with timed() as load_time:
        loaded = load_generator(model, "paligemma", dtype, "--image needs a PaliGemma or Gemma 3 with vision: an HF "
                                "folder whose config.json has model_type 'paligemma' or 'gemma3', or a workdir of a "
                                "paligemma training run")
    cfg = loaded.config
    processor: PaliGemmaProcessor | Gemma3Processor
    if cfg.projector == "gemma3":
        # A prompt without the image marker is a user turn of the chat template; one with it is used as it is.
        processor = Gemma3Processor(loaded.tokenizer, image_size=cfg.vision.image_size,
                                    tokens_per_image=cfg.num_image_tokens)
        texts = [p if BOI in p else processor.chat_prompt(p) for p in prompts]
        batch, end_ids, pad_id = processor(pictures, texts), processor.end_ids, loaded.tokenizer.pad_id or 0
    else:
        processor = PaliGemmaProcessor(loaded.tokenizer, image_size=cfg.vision.image_size,
                                       num_image_tokens=cfg.num_image_tokens)
        batch = processor(pictures, list(prompts), padding_side="left")
        end_ids, pad_id = processor.tokenizer.eos_ids, processor.pad_id
    if processor.image_token_id != cfg.image_token_id:
        raise ValueError(f"{model}: the tokenizer gives the image token id {processor.image_token_id}, the model's "
                         f"config says image_token_id {cfg.image_token_id}")
    with timed() as run:
        result = generate(loaded.module, loaded.params, batch["input_ids"], batch["input_mask"], max_new_tokens,
                          sampler=sampler, rng=jax.random.key(seed), end_ids=end_ids, pad_id=pad_id,
                          images=batch["pixel_values"], mask_ar=batch["mask_ar"])
    completions = []
    for prompt, path, ids, length in zip(prompts, paths, result.tokens, result.lengths, strict=True):
        ids = ids[:length].tolist()
        completions.append({"prompt": prompt, "image": path, "completion": processor.decode(ids), "tokens": ids,
                            "stopped_at_end": bool(length and ids[-1] in end_ids)})
    return _report(model, loaded, sampler, seed, max_new_tokens, completions, result, load_time, run)


def _report(model: str, loaded: Loaded, sampler: SamplerConfig, seed: int, max_new_tokens: int,
            completions: list[dict[str, Any]], result: Generated, load_time: Timing, run: Timing) -> dict[str, Any]:
    """What both front ends return: the settings, the completions and the timings."""
    new_tokens = int(np.sum(result.lengths))
    return {
        "model": model,
        "dtype": jax.tree.leaves(loaded.params)[0].dtype.name,
        "sampler": dataclasses.asdict(sampler),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "completions": completions,
        "new_tokens": new_tokens,
        "load_s": round(load_time.total_s, 3),
        "compile_s": round(run.compile_s, 3),
        "run_s": round(run.run_s, 3),
        "tokens_per_s": round(new_tokens / run.run_s, 2) if run.run_s > 0 else None,
    }
