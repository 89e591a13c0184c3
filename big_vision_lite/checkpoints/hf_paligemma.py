"""Hugging Face PaliGemma and Gemma 3 vision folders (config.json + *.safetensors) <-> `PaliGemmaConfig` and our
params {img, llm} (+ `mm_projector` for Gemma 3).

Axis letters: E vision width, D decoder width, V embedding rows, L layers.

On-disk names (both read, detected by prefix; `layout` picks the one written):

    "legacy" (hub checkpoints, transformers 4.x)    "model" (transformers >= 4.52 in-memory names)
    vision_tower.vision_model.*                     model.vision_tower.*
    multi_modal_projector.linear.{weight, bias}      model.multi_modal_projector.linear.{weight, bias}
    language_model.model.*                          model.language_model.*
    language_model.lm_head.weight (optional)        lm_head.weight (optional)

The vision tower is read with or without its `vision_model.` level under either root: transformers 5.x's
`save_pretrained` writes the legacy root but, its SiglipVisionModel having lost that level, `vision_tower.*`;
4.52-4.57 held `model.vision_tower.vision_model.*` in memory. What is written is the table above.

Mapping: the vision tower as SigLIP's (hf_siglip.py) -> `img/...`; the projector weight [D, E] and bias
[D] -> `img/head/{kernel [E, D], bias [D]}`; the decoder as hf_decoder.py's -> `llm/...`. The output head is
tied to the embedding: a stored lm_head must equal it and is not kept. Conversions are pure transposes and
reshapes, so HF -> ours -> HF returns the same bytes.

Gemma 3 with vision (`model_type: "gemma3"`, transformers' Gemma3ForConditionalGeneration) has the same roots; its
projector holds `multi_modal_projector.mm_input_projection_weight` [E, D] -> `mm_projector/mm_input_projection`
(as it is: transformers multiplies by it, not by its transpose) and `multi_modal_projector.mm_soft_emb_norm.weight`
-> `mm_projector/mm_soft_embedding_norm/scale`; its decoder is a `gemma3_text` one.

The embedding keeps all V = text_config.vocab_size rows. Real checkpoints pad the tokenizer's 257152 ids to 257216
rows (the image token, 257152, is one of the padding rows); transformers' logits cover every row, so ours do too.
"""

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from big_vision_lite.checkpoints.files import (
    CheckpointError,
    ExtraFile,
    check_tensor_shapes,
    read_folder_tensors,
    read_hf_config,
    write_hf_folder,
)
from big_vision_lite.checkpoints.hf_decoder import (
    config_from_hf,
    config_to_hf,
    expected_hf_shapes,
    params_from_hf,
    params_to_hf,
)
from big_vision_lite.checkpoints.hf_siglip import (
    expected_vision_shapes,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_params_from_hf,
    vision_params_to_hf,
)
from big_vision_lite.models.paligemma import PaliGemmaConfig
from big_vision_lite.models.vit import ViTConfig

TEXT_MODEL_TYPES = ("gemma", "gemma2")  # PaliGemma 1 and PaliGemma 2
GEMMA3_TEXT = "gemma3_text"  # Gemma 3 with vision's decoder


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """Where each part of a PaliGemma lives in an HF state dict (name prefixes, and the tied head's name)."""

    vision: str
    projector: str
    llm: str
    lm_head: str


LAYOUTS = {
    "legacy": HFLayout("vision_tower.vision_model.", "multi_modal_projector.linear.", "language_model.model.",
                       "language_model.lm_head.weight"),
    "model": HFLayout("model.vision_tower.", "model.multi_modal_projector.linear.", "model.language_model.",
                      "lm_head.weight"),
}
_LM_HEADS = tuple(layout.lm_head for layout in LAYOUTS.values())


# ---------------------------------------------------------------------------------------------- config


def _vision_without_head(hf: Mapping[str, Any], source: str) -> ViTConfig:
    vision = dict(hf.get("vision_config") or {})
    if vision.get("vision_use_head", True):
        raise CheckpointError(f"{source}: vision_config.vision_use_head is true (or omitted), but {hf['model_type']} "
                              "never uses the MAP head; set it to false (as released checkpoints do) and drop its "
                              "weights")
    return vision_config_from_hf(vision, source)


def _check_tied(hf: Mapping[str, Any], text: Mapping[str, Any], source: str) -> None:
    for where, value in (("tie_word_embeddings", hf.get("tie_word_embeddings", True)),
                         ("text_config.tie_word_embeddings", text.get("tie_word_embeddings", True))):
        if not value:
            raise CheckpointError(f"{source}: {where} is false; the output head is the embedding (tied)")


def gemma3_config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> PaliGemmaConfig:
    """Our config of a transformers Gemma3Config dict (`model_type: "gemma3"`): a gemma3_text decoder, the SigLIP
    tower without head, Gemma 3's projector (omitted: 256 tokens per image, image token 262144)."""
    text = {"model_type": GEMMA3_TEXT, **(hf.get("text_config") or {})}
    if text["model_type"] != GEMMA3_TEXT:
        raise CheckpointError(f"{source}: text_config.model_type {text['model_type']!r} is not {GEMMA3_TEXT!r}")
    _check_tied(hf, text, source)
    llm = dataclasses.replace(config_from_hf(text, f"{source} (text_config)"), bidirectional_beyond_window=False)
    try:
        return PaliGemmaConfig(vision=_vision_without_head(hf, source), llm=llm,
                               image_token_id=hf.get("image_token_id", hf.get("image_token_index", 262144)),
                               projector="gemma3", mm_tokens_per_image=hf.get("mm_tokens_per_image", 256))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def paligemma_config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> PaliGemmaConfig:
    """Our `PaliGemmaConfig` from a transformers PaliGemmaConfig dict (`model_type: "paligemma"`), or a Gemma3Config
    one (`"gemma3"`, `gemma3_config_from_hf`).

    Omitted keys mean what transformers gives them: text `model_type` gemma, a tanh-GELU, head_dim 256,
    `projection_dim` 2048, SigLIP's vision defaults (with `vision_use_head` true, which PaliGemma cannot use).
    """
    if hf.get("model_type") == "gemma3":
        return gemma3_config_from_hf(hf, source)
    if hf.get("model_type") != "paligemma":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not 'paligemma' or 'gemma3'")
    text = {"model_type": "gemma", **(hf.get("text_config") or {})}
    if text["model_type"] not in TEXT_MODEL_TYPES:
        raise CheckpointError(f"{source}: text_config.model_type {text['model_type']!r} is not supported; "
                              f"supported: {TEXT_MODEL_TYPES}")
    # GemmaConfig's and Gemma2Config's defaults where they differ from what `config_from_hf` assumes (released
    # PaliGemma 1 configs omit head_dim: 256, which there also equals width / heads).
    if not (text.get("hidden_activation") or text.get("hidden_act")):
        text["hidden_act"] = "gelu_pytorch_tanh"
    if text.get("head_dim") is None:
        text["head_dim"] = 256
    _check_tied(hf, text, source)
    llm = config_from_hf(text, f"{source} (text_config)")
    vit = _vision_without_head(hf, source)
    projection = hf.get("projection_dim", 2048)
    if projection != llm.width:
        raise CheckpointError(f"{source}: projection_dim {projection} differs from text_config.hidden_size "
                              f"{llm.width}; the projector must map image tokens to the decoder width")
    image_token_id = hf.get("image_token_id", hf.get("image_token_index", 256000))
    try:
        return PaliGemmaConfig(vision=dataclasses.replace(vit, head_size=llm.width), llm=llm,
                               image_token_id=image_token_id)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def paligemma_config_to_hf(cfg: PaliGemmaConfig) -> dict[str, Any]:
    """The config.json dict (transformers 5.x PaliGemmaConfig, or Gemma3Config for Gemma 3's projector) of `cfg`; a
    ValueError if HF cannot express it."""
    if cfg.experts:
        raise ValueError(f"HF PaliGemma has one decoder; this config has {len(cfg.experts)} extra experts")
    if cfg.projector == "gemma3":
        if cfg.llm.family != GEMMA3_TEXT or cfg.llm.bidirectional_beyond_window:
            raise ValueError(f"HF Gemma 3's decoder is a {GEMMA3_TEXT} one whose window cuts through images")
        text = config_to_hf(cfg.llm)
        del text["architectures"]
        return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                "image_token_index": cfg.image_token_id, "mm_tokens_per_image": cfg.mm_tokens_per_image,
                "tie_word_embeddings": True, "text_config": text, "vision_config": vision_config_to_hf(cfg.vision)}
    if cfg.llm.family not in TEXT_MODEL_TYPES:
        raise ValueError(f"HF PaliGemma's decoder is one of {TEXT_MODEL_TYPES}, not {cfg.llm.family!r}")
    if not cfg.llm.tie_embeddings:
        raise ValueError("HF PaliGemma ties its output head to the embedding; llm.tie_embeddings must be true")
    text = config_to_hf(cfg.llm)
    del text["architectures"]  # a sub-config, not a model of its own
    d = cfg.llm.width
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "image_token_index": cfg.image_token_id,
        "projection_dim": d,
        "hidden_size": d,
        "vocab_size": cfg.llm.vocab_size,
        "tie_word_embeddings": True,
        "text_config": text,
        "vision_config": vision_config_to_hf(cfg.vision) | {"projection_dim": d},
    }


# ---------------------------------------------------------------------------------------------- state dicts


def detect_layout(state: Mapping[str, Any], source: str = "state dict") -> HFLayout:
    """The layout of an HF PaliGemma state dict, from its names (see the module docstring)."""
    base = LAYOUTS["model" if any(name.startswith("model.") for name in state) else "legacy"]
    root = base.vision.removesuffix("vision_model.")  # "vision_tower." or "model.vision_tower."
    for vision in (f"{root}vision_model.", root):
        if any(name.startswith(vision) for name in state):
            return dataclasses.replace(base, vision=vision)
    raise CheckpointError(f"{source}: no PaliGemma vision tower found: expected tensors under 'vision_tower.' "
                          f"(legacy layout) or 'model.vision_tower.' (model layout); names start with "
                          f"{sorted({name.split('.')[0] for name in state})[:5]}")


def expected_paligemma_shapes(cfg: PaliGemmaConfig, layout: HFLayout) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF PaliGemma checkpoint of `cfg` holds in `layout`, with its shape (tied head excluded)."""
    d, e = cfg.llm.width, cfg.vision.width
    shapes = expected_vision_shapes(cfg.vision, layout.vision)
    if cfg.projector == "gemma3":
        root = _gemma3_projector(layout)
        shapes |= {f"{root}mm_input_projection_weight": (e, d), f"{root}mm_soft_emb_norm.weight": (e,)}
    else:
        shapes |= {f"{layout.projector}weight": (d, e), f"{layout.projector}bias": (d,)}
    return shapes | expected_hf_shapes(cfg.llm, layout.llm)


def _gemma3_projector(layout: HFLayout) -> str:
    """Gemma 3's projector prefix: PaliGemma's without its `linear.` level."""
    return layout.projector.removesuffix("linear.")


def check_paligemma_state(state: Mapping[str, np.ndarray], cfg: PaliGemmaConfig, layout: HFLayout,
                          source: str = "state dict", where: Mapping[str, Any] | None = None) -> None:
    """Every expected tensor is there with its shape, a stored lm_head equals the embedding, nothing else is
    there (CheckpointError naming the tensor and its file otherwise)."""
    where = where or {}
    expected = expected_paligemma_shapes(cfg, layout)
    check_tensor_shapes(state, expected, source, where)
    embedding = f"{layout.llm}embed_tokens.weight"
    for head in (name for name in _LM_HEADS if name in state):
        if np.shape(state[head]) != np.shape(state[embedding]) or not np.array_equal(state[head], state[embedding]):
            raise CheckpointError(f"{where.get(head, source)}: tensor {head!r} differs from {embedding!r}; "
                                  f"PaliGemma's output head is tied to the embedding, so they must be equal")
    # Rotary tables and position ids are derived buffers; anything else is a feature we would drop.
    unexpected = sorted(n for n in state if n not in expected and n not in _LM_HEADS
                        and "rotary_emb" not in n and not n.endswith("position_ids"))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {unexpected[:5]} (not part of a PaliGemma of this "
                              f"config)")


def paligemma_params_from_hf(state: Mapping[str, np.ndarray], cfg: PaliGemmaConfig, source: str = "state dict",
                             where: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Our params {img, llm} (dtype as stored; ViT blocks and decoder layers unrolled) from an HF PaliGemma state
    dict in either layout, checked first."""
    layout = detect_layout(state, source)
    check_paligemma_state(state, cfg, layout, source, where)
    img = vision_params_from_hf(state, cfg.vision, layout.vision)
    params = {"img": img, "llm": params_from_hf(state, cfg.llm, layout.llm)}
    if cfg.projector == "gemma3":
        root = _gemma3_projector(layout)
        params["mm_projector"] = {"mm_input_projection": state[f"{root}mm_input_projection_weight"],
                                  "mm_soft_embedding_norm": {"scale": state[f"{root}mm_soft_emb_norm.weight"]}}
    else:
        img["head"] = {"kernel": state[f"{layout.projector}weight"].T, "bias": state[f"{layout.projector}bias"]}
    return params


def paligemma_params_to_hf(params: Mapping[str, Any], cfg: PaliGemmaConfig,
                           layout: str | HFLayout = "legacy") -> dict[str, np.ndarray]:
    """The HF state dict of our params (either block layout) in `layout` ("legacy", "model", or the `HFLayout`
    `detect_layout` found in a source, e.g. transformers' own save with its flat vision tower), without the tied
    lm_head (as transformers saves it); the exact inverse of `paligemma_params_from_hf`."""
    if not isinstance(layout, HFLayout) and layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {sorted(LAYOUTS)}")
    paligemma_config_to_hf(cfg)  # raises if HF cannot express the model
    names = layout if isinstance(layout, HFLayout) else LAYOUTS[layout]
    img = params["img"]
    state = vision_params_to_hf(img, cfg.vision, names.vision)
    if cfg.projector == "gemma3":
        root, projector = _gemma3_projector(names), params["mm_projector"]
        state[f"{root}mm_input_projection_weight"] = np.ascontiguousarray(projector["mm_input_projection"])
        state[f"{root}mm_soft_emb_norm.weight"] = np.ascontiguousarray(projector["mm_soft_embedding_norm"]["scale"])
    else:
        state[f"{names.projector}weight"] = np.ascontiguousarray(np.asarray(img["head"]["kernel"]).T)
        state[f"{names.projector}bias"] = np.ascontiguousarray(np.asarray(img["head"]["bias"]))
    return state | params_to_hf(params["llm"], cfg.llm, names.llm)


# ---------------------------------------------------------------------------------------------- folders


def read_paligemma_hf(folder: str | Path) -> tuple[PaliGemmaConfig, dict[str, Any], dict[str, Any]]:
    """(config, checked params as `paligemma_params_from_hf` returns them, raw config.json) of an HF folder."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    cfg = paligemma_config_from_hf(hf, str(folder / "config.json"))
    state, where = read_folder_tensors(folder)
    files = sorted({str(path) for path in where.values()})
    source = files[0] if len(files) == 1 else str(folder)
    return cfg, paligemma_params_from_hf(state, cfg, source, where), hf


def save_paligemma_hf(folder: str | Path, cfg: PaliGemmaConfig, params: Mapping[str, Any],
                      layout: str | HFLayout = "legacy",
                      hf_config: Mapping[str, Any] | None = None, extra_files: Iterable[ExtraFile] = ()) -> Path:
    """Writes config.json and model.safetensors (tensors as given, names per `layout`); the folder appears only
    once complete. `hf_config` (e.g. the original config.json) is written instead of the one derived from `cfg`."""
    state = paligemma_params_to_hf(params, cfg, layout)
    return write_hf_folder(folder, hf_config or paligemma_config_to_hf(cfg), state, extra_files)
