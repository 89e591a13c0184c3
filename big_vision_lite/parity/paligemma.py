"""PaliGemma parity (HF `PaliGemmaForConditionalGeneration`): the batch and the forward passes of both sides.

Axis letters: B batch, R image side, P image tokens, T tokens, E vision width, D decoder width, V embedding rows.

Both sides load the same HF folder and get the same deterministic batch (seeded): images [B, R, R, 3] uniform in
[-1, 1] (channels first for PyTorch) and B = 2 rows of token ids laid out as transformers' processor does,
`<image> * P + bos + prefix + sep`, followed by a suffix; the second row's prefix is shorter and the row is
left-padded. The image + prefix attend bidirectionally (our `mask_ar` 0, HF `token_type_ids` 0), the suffix
causally (1). Positions are cumsum(mask) - 1, passed to transformers explicitly: its PaliGemma defaults to
1-indexed positions (RoPE only sees differences, so this changes rounding, not meaning). Text ids are drawn below
min(V, image_token_id), the ids a tokenizer produces; the embedding's padding rows still take part in the logits.

Compared, each as max |ours - ref| and ||ours - ref|| / ||ref|| (decoder stages on real tokens only): the vision
tower's embeddings, every encoder block, its final-normed tokens (`img/encoded`), the projector output
(`image_tokens`, the image features the decoder receives), the decoder's input embeddings (image tokens merged),
every decoder layer, the final norm and the logits. Then both sides greedy-decode the prompts (image + prefix,
no suffix) with the image: ours with `generate(..., images=..., mask_ar=zeros)`, theirs with `generate(...,
pixel_values=..., token_type_ids=zeros, do_sample=False)`; `greedy_match` compares the ids.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np

from big_vision_lite.checkpoints import Loaded
from big_vision_lite.decoding.engine import jitted_prefill
from big_vision_lite.models.masks import positions_from_mask
from big_vision_lite.models.paligemma import PaliGemmaConfig, gemma3_mask_ar
from big_vision_lite.parity import torch_side
from big_vision_lite.parity.decoder import drill_into_first_failure, our_greedy, our_substages, reference_substages
from big_vision_lite.parity.golden import ReferenceSide
from big_vision_lite.parity.report import compare_stages, greedy_fields
from big_vision_lite.utils.timing import Stopwatch

BOS_ID = 2  # Gemma's


def paligemma_parity_batch(cfg: PaliGemmaConfig, batch: int = 2, prefix_len: int = 6, suffix_len: int = 8,
                           seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs: `images` [B, R, R, 3] float32 in [-1, 1]; the full rows `tokens`, `mask`, `mask_ar`
    and transformers' `token_type_ids` [B, T] (image + prefix, then suffix); the prompts alone `prompt_tokens`,
    `prompt_mask`, `prompt_mask_ar`, `prompt_token_type_ids` [B, T - suffix_len].

    Row b's prefix is `prefix_len - 2 b` ids long (at least 1), so every row after the first is left-padded.
    Gemma 3 (`projector "gemma3"`) rows put the image inside the text, `bos + 2 ids + image + prefix`, as its
    processor does (text before the image must be seen causally by it), with `mask_ar` from `gemma3_mask_ar`.
    """
    rng = np.random.default_rng(seed)
    r, p = cfg.vision.image_size, cfg.num_image_tokens
    images = rng.uniform(-1.0, 1.0, size=(batch, r, r, 3)).astype(np.float32)
    text_vocab = min(cfg.llm.vocab_size, cfg.image_token_id)  # ids a tokenizer produces: never the image token
    if text_vocab <= BOS_ID + 1:
        raise ValueError(f"vocab_size {cfg.llm.vocab_size} / image_token_id {cfg.image_token_id} leave no text ids")
    prompts = []
    for row in range(batch):
        n = max(1, prefix_len - 2 * row)
        text = rng.integers(BOS_ID + 1, text_vocab, n + 1).tolist()
        if cfg.projector == "gemma3":
            lead = rng.integers(BOS_ID + 1, text_vocab, 2).tolist()
            prompts.append([BOS_ID, *lead] + [cfg.image_token_id] * p + text)
        else:
            prompts.append([cfg.image_token_id] * p + [BOS_ID] + text)
    width = max(len(ids) for ids in prompts)
    prompt_tokens = np.zeros((batch, width), np.int32)
    prompt_mask = np.zeros((batch, width), bool)
    for row, ids in enumerate(prompts):
        prompt_tokens[row, width - len(ids):] = ids
        prompt_mask[row, width - len(ids):] = True
    suffix = rng.integers(BOS_ID + 1, text_vocab, size=(batch, suffix_len)).astype(np.int32)
    tokens = np.concatenate([prompt_tokens, suffix], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(suffix, bool)], axis=1)
    if cfg.projector == "gemma3":
        # transformers marks image tokens (token_type_ids 1), the blocks that attend bidirectionally.
        mask_ar, prompt_mask_ar = gemma3_mask_ar(tokens, cfg.image_token_id), gemma3_mask_ar(prompt_tokens,
                                                                                          cfg.image_token_id)
        token_types, prompt_token_types = tokens == cfg.image_token_id, prompt_tokens == cfg.image_token_id
    else:
        # transformers' PaliGemma marks the suffix (token_type_ids 1): our mask_ar as it is.
        mask_ar = np.concatenate([np.zeros_like(prompt_tokens), np.ones_like(suffix)], axis=1)
        prompt_mask_ar = np.zeros_like(prompt_tokens)
        token_types, prompt_token_types = mask_ar, prompt_mask_ar
    return {"images": images, "tokens": tokens, "mask": mask, "mask_ar": mask_ar, "token_type_ids": token_types,
            "prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask, "prompt_mask_ar": prompt_mask_ar,
            "prompt_token_type_ids": prompt_token_types}


def _reference_forward(model: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reference activations (float32 numpy): the vision tower's stages, the projector, every decoder stage."""
    import torch

    long = torch_side.long_tensor
    positions = np.asarray(positions_from_mask(jnp.asarray(batch["mask"])))
    pixels = torch_side.pixels_nchw(batch["images"], model.dtype)
    with torch_side.capture_decoder_stages(model.model.language_model) as captured, torch.no_grad():
        vision = model.model.vision_tower(pixels, output_hidden_states=True)
        out = model(input_ids=long(batch["tokens"]), pixel_values=pixels, attention_mask=long(batch["mask"]),
                    position_ids=long(positions), token_type_ids=long(batch["token_type_ids"]), use_cache=False)
    captured["img/embeddings"] = vision.hidden_states[0]
    captured |= {f"img/layer_{i}": h for i, h in enumerate(vision.hidden_states[1:])}
    captured["img/encoded"] = vision.last_hidden_state
    captured["image_tokens"] = out.image_outputs.pooler_output
    captured["logits"] = out.logits
    return torch_side.to_numpy(captured)


def _our_forward(loaded: Loaded, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    logits, _, out = jitted_prefill(loaded.module, loaded.params, jnp.asarray(batch["tokens"]),
                                    jnp.asarray(batch["mask"]), mask_ar=jnp.asarray(batch["mask_ar"]),
                                    images=jnp.asarray(batch["images"]), last_logits_only=False)
    vision = out["vision"]
    ours = {"img/embeddings": vision["with_posemb"], "img/encoded": vision["encoded"],
            "image_tokens": out["image_tokens"], "embeddings": out["embeddings"], "final_norm": out["final"],
            "logits": logits}
    ours |= {f"img/layer_{i}": h for i, h in enumerate(vision["blocks"])}
    ours |= {f"layer_{i}": h for i, h in enumerate(out["hidden"])}
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in ours.items()}


def compare(loaded: Loaded, reference: ReferenceSide, watch: Stopwatch, tolerance: float, *, greedy_tokens: int = 32,
            prefix_len: int = 6, suffix_len: int = 8, seed: int = 0) -> dict[str, Any]:
    """Every stage of both towers and the greedy ids with the image (see the module docstring): the
    `ParityReport` fields."""
    cfg = loaded.config
    batch = paligemma_parity_batch(cfg, prefix_len=prefix_len, suffix_len=suffix_len, seed=seed)
    inputs = {k: batch[k] for k in ("images", "tokens", "mask", "mask_ar")}
    with watch("forward_reference"):
        ref = reference.run("forward", inputs, lambda: _reference_forward(reference.model, batch))
    with watch("forward_truth"):
        truth = reference.run_truth("forward", inputs, lambda model: _reference_forward(model, batch))
    with watch("forward_ours"):
        ours = _our_forward(loaded, batch)
    images_valid = np.ones(len(batch["images"]), bool)
    names = ["img/embeddings", *[f"img/layer_{i}" for i in range(cfg.vision.depth)], "img/encoded", "image_tokens"]
    layers, truth_errors = compare_stages(names, ours, ref, truth, images_valid)
    names = ["embeddings", *[f"layer_{i}" for i in range(cfg.llm.depth)], "final_norm", "logits"]
    text_layers, text_truth = compare_stages(names, ours, ref, truth, batch["mask"])
    del ref, ours, truth
    model_type = "gemma3" if cfg.projector == "gemma3" else "paligemma"
    fields = {"model_type": model_type, "layers": layers + text_layers, "truth": truth_errors + text_truth}
    fields |= drill_into_first_failure(
        fields["layers"], tolerance, reference, watch, inputs,
        lambda i: our_substages(loaded, i, batch["tokens"], batch["mask"], batch["mask_ar"], images=batch["images"]),
        lambda i: reference_substages(reference.model.model.language_model.layers[i],
                                      lambda: _reference_forward(reference.model, batch)))

    prompts, prompt_mask = batch["prompt_tokens"], batch["prompt_mask"]
    with watch("greedy_reference"):
        greedy_ref = reference.run("greedy", {"prompts": prompts, "mask": prompt_mask, "images": batch["images"]},
                                   lambda: torch_side.greedy(
                                       reference.model, prompts, prompt_mask, greedy_tokens,
                                       pixel_values=torch_side.pixels_nchw(batch["images"], reference.model.dtype),
                                       token_type_ids=torch_side.long_tensor(batch["prompt_token_type_ids"])))
    with watch("greedy_ours"):
        greedy_ours = our_greedy(loaded.module.clone(return_hidden=False), loaded.params, prompts, prompt_mask,
                                 greedy_tokens, images=batch["images"], mask_ar=batch["prompt_mask_ar"])
    return fields | greedy_fields(greedy_ours, greedy_ref)
