"""Golden-value parity of our PaliGemma against transformers' PaliGemmaForConditionalGeneration (eager attention).

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
pixel_values=..., token_type_ids=zeros, do_sample=False)`; `greedy_match` compares the ids. Same JSON contract and
tolerances as parity.py; `ok` means every relative error is within tolerance and (float32) the greedy ids match.
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.checkpoints.paligemma import load_paligemma
from big_vision_lite.generate import generate, make_apply
from big_vision_lite.models.gemma import positions_from_mask
from big_vision_lite.models.paligemma import PaliGemmaConfig, make_attn_mask
from big_vision_lite.parity import TINY_PARAMS, TOLERANCES, ParityReport, _errors, capture_decoder_stages

BOS_ID = 2  # Gemma's


def paligemma_parity_batch(cfg: PaliGemmaConfig, batch: int = 2, prefix_len: int = 6, suffix_len: int = 8,
                           seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs: `images` [B, R, R, 3] float32 in [-1, 1]; the full rows `tokens`, `mask`, `mask_ar`
    [B, T] (image + prefix, then suffix); the prompts alone `prompt_tokens`, `prompt_mask` [B, T - suffix_len].

    Row b's prefix is `prefix_len - 2 b` ids long (at least 1), so every row after the first is left-padded.
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
        prompts.append([cfg.image_token_id] * p + [BOS_ID] + rng.integers(BOS_ID + 1, text_vocab, n + 1).tolist())
    width = max(len(ids) for ids in prompts)
    prompt_tokens = np.zeros((batch, width), np.int32)
    prompt_mask = np.zeros((batch, width), bool)
    for row, ids in enumerate(prompts):
        prompt_tokens[row, width - len(ids):] = ids
        prompt_mask[row, width - len(ids):] = True
    suffix = rng.integers(BOS_ID + 1, text_vocab, size=(batch, suffix_len)).astype(np.int32)
    tokens = np.concatenate([prompt_tokens, suffix], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(suffix, bool)], axis=1)
    mask_ar = np.concatenate([np.zeros_like(prompt_tokens), np.ones_like(suffix)], axis=1)
    return {"images": images, "tokens": tokens, "mask": mask, "mask_ar": mask_ar,
            "prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask}


def _load_reference(folder: str, dtype: str):
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype, attn_implementation="eager")
    return model.eval()


def _torch_forward(model, batch: dict[str, np.ndarray], positions: np.ndarray) -> dict[str, np.ndarray]:
    """Reference activations (float32 numpy): the vision tower's stages, the projector, every decoder stage."""
    import torch

    as_long = lambda a: torch.from_numpy(np.asarray(a, np.int64))  # noqa: E731
    pixels = torch.from_numpy(np.ascontiguousarray(batch["images"].transpose(0, 3, 1, 2))).to(model.dtype)
    with capture_decoder_stages(model.model.language_model) as captured, torch.no_grad():
        vision = model.model.vision_tower(pixels, output_hidden_states=True)
        out = model(input_ids=as_long(batch["tokens"]), pixel_values=pixels, attention_mask=as_long(batch["mask"]),
                    position_ids=as_long(positions), token_type_ids=as_long(batch["mask_ar"]), use_cache=False)
    captured["img/embeddings"] = vision.hidden_states[0]
    captured |= {f"img/layer_{i}": h for i, h in enumerate(vision.hidden_states[1:])}
    captured["img/encoded"] = vision.last_hidden_state
    captured["image_tokens"] = out.image_hidden_states
    captured["logits"] = out.logits
    return {k: v.float().numpy() for k, v in captured.items()}


def _our_forward(module, params, batch: dict[str, np.ndarray], positions: np.ndarray) -> dict[str, np.ndarray]:
    attn_mask = make_attn_mask(jnp.asarray(batch["mask"]), jnp.asarray(batch["mask_ar"]))
    logits, _, out = make_apply(module)(params, jnp.asarray(batch["tokens"]), jnp.asarray(positions), attn_mask,
                                        None, images=jnp.asarray(batch["images"]))
    vision = out["vision"]
    ours = {"img/embeddings": vision["with_posemb"], "img/encoded": vision["encoded"],
            "image_tokens": out["image_tokens"], "embeddings": out["embeddings"], "final_norm": out["final"],
            "logits": logits}
    ours |= {f"img/layer_{i}": h for i, h in enumerate(vision["blocks"])}
    ours |= {f"layer_{i}": h for i, h in enumerate(out["hidden"])}
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in ours.items()}


def _torch_greedy(model, batch: dict[str, np.ndarray], max_new_tokens: int) -> np.ndarray:
    import torch

    tokens = batch["prompt_tokens"]
    pixels = torch.from_numpy(np.ascontiguousarray(batch["images"].transpose(0, 3, 1, 2))).to(model.dtype)
    # No early stop: both sides produce exactly max_new_tokens ids, EOS included.
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(tokens.astype(np.int64)), pixel_values=pixels,
                             attention_mask=torch.from_numpy(batch["prompt_mask"].astype(np.int64)),
                             token_type_ids=torch.zeros(tokens.shape, dtype=torch.int64),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                             top_k=None, top_p=None, temperature=None)
    return out[:, tokens.shape[1]:].numpy()


def run_paligemma_parity(
    folder: str | Path,
    dtype: str = "float32",
    *,
    tolerance: float | None = None,
    greedy_tokens: int = 32,
    prefix_len: int = 6,
    suffix_len: int = 8,
    seed: int = 0,
) -> ParityReport:
    """Loads both sides from an HF PaliGemma folder, compares every stage and greedy ids (module docstring)."""
    folder = str(folder)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    module, params, cfg = load_paligemma(folder, dtype, return_hidden=True)
    seconds["load_ours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = _load_reference(folder, dtype)
    seconds["load_reference"] = time.perf_counter() - t0

    batch = paligemma_parity_batch(cfg, prefix_len=prefix_len, suffix_len=suffix_len, seed=seed)
    positions = np.asarray(positions_from_mask(jnp.asarray(batch["mask"])))
    t0 = time.perf_counter()
    ref = _torch_forward(reference, batch, positions)
    seconds["forward_reference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = _our_forward(module, params, batch, positions)
    seconds["forward_ours"] = time.perf_counter() - t0

    images_valid = np.ones(len(batch["images"]), bool)
    names = ["img/embeddings", *[f"img/layer_{i}" for i in range(cfg.vision.depth)], "img/encoded", "image_tokens"]
    layers = [_errors(n, ours[n], ref[n], images_valid) for n in names]
    names = ["embeddings", *[f"layer_{i}" for i in range(cfg.llm.depth)], "final_norm", "logits"]
    layers += [_errors(n, ours[n], ref[n], batch["mask"]) for n in names]
    del ref, ours

    t0 = time.perf_counter()
    greedy_ref = _torch_greedy(reference, batch, greedy_tokens)
    seconds["greedy_reference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy_ours = generate(module.clone(return_hidden=False), params, batch["prompt_tokens"], batch["prompt_mask"],
                           greedy_tokens, images=batch["images"],
                           mask_ar=np.zeros_like(batch["prompt_tokens"])).tokens
    seconds["greedy_ours"] = time.perf_counter() - t0

    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    size = "tiny" if n_params < TINY_PARAMS else "real"
    return ParityReport(
        model=Path(folder).name,
        model_type="paligemma",
        dtype=dtype,
        tolerance=tolerance if tolerance is not None else TOLERANCES[(dtype, size)],
        layers=layers,
        greedy_ours=greedy_ours.tolist(),
        greedy_ref=greedy_ref.tolist(),
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
