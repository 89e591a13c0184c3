"""Hugging Face `SiglipModel` folders (config.json + *.safetensors) <-> `TwoTowersConfig` and our params pytree.

Axis letters: D width, F mlp hidden, N heads, H head dim, E text head width, V vocabulary, p patch size,
P patches, L text max_len.

HF layouts (torch Linear weight is [out, in], Conv2d is OIHW [D, 3, p, p]) and ours:

    vision_model.embeddings.patch_embedding.{weight [D, 3, p, p], bias}  img/embedding/{kernel [p, p, 3, D], bias}
    vision_model.embeddings.position_embedding.weight [P, D]            img/pos_embedding [1, P, D]
    vision_model.encoder.layers.{i}.layer_norm1 / layer_norm2           .../encoderblock_{i}/LayerNorm_0 / _1
    ... self_attn.{q,k,v}_proj.{weight [N*H, D], bias [N*H]}           .../{query,key,value}/{kernel [D, N, H],
                                                                          bias [N, H]}
    ... self_attn.out_proj.{weight [D, N*H], bias}                      .../out/{kernel [N, H, D], bias}
    ... mlp.fc1 [F, D] / mlp.fc2 [D, F]                                 .../MlpBlock_0/Dense_0 [D, F] / Dense_1 [F, D]
    vision_model.post_layernorm                                         img/Transformer/encoder_norm
    vision_model.head.probe [1, 1, D]                                   img/MAPHead_0/probe
    vision_model.head.attention.in_proj_{weight [3D, D], bias [3D]}     MAPHead_0/MultiHeadDotProductAttention_0/
                                                                          {query,key,value} (packed q | k | v)
    vision_model.head.attention.out_proj, head.layernorm, head.mlp      .../out, MAPHead_0/LayerNorm_0, MlpBlock_0
    text_model.embeddings.token_embedding.weight [V, D]                 txt/Embed_0/embedding
    text_model.embeddings.position_embedding.weight [L, D]              txt/pos_embedding [1, L, D]
    text_model.encoder.layers.{i}...                                    txt/Encoder_0/encoderblock_{i}/...
    text_model.final_layer_norm / text_model.head [E, D]                txt/Encoder_0/encoder_norm / txt/head
    logit_scale [1] (log value), logit_bias [1]                         t [1] (t'), b [1]

HF's vision tower has no linear head: its embedding width is the vision width, and SiglipModel needs the text
`projection_size` to equal it. With `vision_use_head: false` the MAP head is absent (PaliGemma's tower): the
folder converts (pool_type "none"), but transformers 5.23's SiglipModel.forward cannot run it (pooler_output is
None and it fails normalising it), so only the towers' features are comparable then (see parity/siglip.py).

Conversions are pure transposes and reshapes, so HF -> ours -> HF returns the same bytes.
"""

import math
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
from big_vision_lite.models.text import TextConfig
from big_vision_lite.models.two_towers import TwoTowersConfig, relayout_two_towers
from big_vision_lite.models.vit import ViTConfig, relayout_vit

_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")  # all tanh-approximated GELU in transformers


# ---------------------------------------------------------------------------------------------- config


SIGLIP_MODEL_TYPES = ("siglip", "siglip2")


def _square(value: Any, name: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{source}: {name} {value!r} is not square; only square images/patches are supported")
        value = value[0]
    return int(value)


def _check_activation(sub: Mapping[str, Any], kind: str, source: str) -> None:
    act = sub.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: {kind}.hidden_act {act!r} is not supported; supported: {_ACTIVATIONS}")


def vision_config_from_hf(vision: Mapping[str, Any], source: str = "config.json", naflex: bool = False) -> ViTConfig:
    """Our `ViTConfig` (no linear head) from a transformers SiglipVisionConfig dict (a `vision_config` entry), or a
    Siglip2VisionConfig one (`naflex`: its `num_patches` positions form the G x G grid, image_size = G * patch).

    The defaults are transformers' SiglipVisionConfig / Siglip2VisionConfig defaults (what an omitted key means)."""
    _check_activation(vision, "vision_config", source)
    if vision.get("num_channels", 3) != 3:
        raise CheckpointError(f"{source}: vision_config.num_channels {vision['num_channels']} is not 3")
    patch = _square(vision.get("patch_size", 16), "vision_config.patch_size", source)
    if naflex:
        positions = vision.get("num_patches", 256)
        side = math.isqrt(positions)
        if side * side != positions:
            raise CheckpointError(f"{source}: vision_config.num_patches {positions} is not a square (the position "
                                  "grid is G x G)")
        image_size = side * patch
    else:
        image_size = _square(vision.get("image_size", 224), "vision_config.image_size", source)
    try:
        return ViTConfig(
            width=vision.get("hidden_size", 768),
            depth=vision.get("num_hidden_layers", 12),
            mlp_dim=vision.get("intermediate_size", 3072),
            num_heads=vision.get("num_attention_heads", 12),
            patch_size=patch,
            image_size=image_size,
            naflex=naflex,
            pool_type="map" if vision.get("vision_use_head", True) else "none",
            head_size=None,
            norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def vision_config_to_hf(img: ViTConfig) -> dict[str, Any]:
    """The `vision_config` dict (transformers `SiglipVisionConfig`) of a ViT tower; its linear head, if any, is
    not part of it (SiglipModel has none; PaliGemma's is the separate projector)."""
    grid = {"num_patches": img.num_patches} if img.naflex else {"image_size": img.image_size}
    return {
        "model_type": "siglip2_vision_model" if img.naflex else "siglip_vision_model",
        "hidden_size": img.width,
        "intermediate_size": img.mlp_dim,
        "num_hidden_layers": img.depth,
        "num_attention_heads": img.num_heads,
        "num_channels": 3,
        **grid,
        "patch_size": img.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": img.norm_eps,
        "vision_use_head": img.pool_type == "map",
    }


def siglip_config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> TwoTowersConfig:
    """Our `TwoTowersConfig` from a transformers SiglipConfig dict (`model_type: "siglip"`), or a Siglip2Config one
    (`"siglip2"`: a NaFlex image tower, the same text tower)."""
    if hf.get("model_type") not in SIGLIP_MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not one of {SIGLIP_MODEL_TYPES} "
                              "(a SiglipModel or Siglip2Model folder)")
    vision, text = dict(hf.get("vision_config") or {}), dict(hf.get("text_config") or {})
    image = vision_config_from_hf(vision, source, naflex=hf["model_type"] == "siglip2")
    _check_activation(text, "text_config", source)
    # The defaults are transformers' SiglipTextConfig defaults (what an omitted key means).
    try:
        t_width = text.get("hidden_size", 768)
        txt = TextConfig(
            vocab_size=text.get("vocab_size", 32000),
            width=t_width,
            depth=text.get("num_hidden_layers", 12),
            mlp_dim=text.get("intermediate_size", 3072),
            num_heads=text.get("num_attention_heads", 12),
            max_len=text.get("max_position_embeddings", 64),
            head_size=text.get("projection_size") or t_width,
            norm_eps=float(text.get("layer_norm_eps", 1e-6)),
        )
        return TwoTowersConfig(image=image, text=txt)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def siglip_config_to_hf(cfg: TwoTowersConfig) -> dict[str, Any]:
    """The config.json dict (transformers `SiglipConfig`) of `cfg`; a ValueError if HF cannot express it."""
    img, txt = cfg.image, cfg.text
    if img.head_size is not None:
        raise ValueError(f"HF SiglipModel has no vision linear head; image.head_size must be None, got {img.head_size}")
    if img.pool_type not in ("map", "none"):
        raise ValueError(f"HF SiglipModel pools images with the MAP head or not at all; pool_type {img.pool_type!r}")
    if txt.head_size is None:
        raise ValueError("HF SiglipTextModel always has a linear head; text.head_size must be set")
    if img.pool_type == "map" and txt.head_size != img.width:
        raise ValueError(f"HF SiglipModel needs text.head_size (projection_size) {txt.head_size} == image.width "
                         f"{img.width}")
    vision_config = vision_config_to_hf(img)
    text_config = {
        "model_type": "siglip2_text_model" if img.naflex else "siglip_text_model",
        "vocab_size": txt.vocab_size,
        "hidden_size": txt.width,
        "intermediate_size": txt.mlp_dim,
        "num_hidden_layers": txt.depth,
        "num_attention_heads": txt.num_heads,
        "max_position_embeddings": txt.max_len,
        "projection_size": txt.head_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": txt.norm_eps,
        # SigLIP's sentencepiece tokenizers pad with EOS = 1; transformers' defaults (49406/49407) are CLIP's.
        "pad_token_id": 1 if txt.vocab_size > 1 else None,
        "bos_token_id": None,
        "eos_token_id": 1 if txt.vocab_size > 1 else None,
    }
    if img.naflex:
        return {"architectures": ["Siglip2Model"], "model_type": "siglip2", "initializer_factor": 1.0,
                "vision_config": vision_config, "text_config": text_config}
    return {"architectures": ["SiglipModel"], "model_type": "siglip", "initializer_factor": 1.0,
            "vision_config": vision_config, "text_config": text_config}


# ---------------------------------------------------------------------------------------------- shapes


def _encoder_shapes(prefix: str, depth: int, d: int, f: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(depth):
        p = f"{prefix}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{p}{norm}.weight": (d,), f"{p}{norm}.bias": (d,)}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{p}self_attn.{proj}.weight": (d, d), f"{p}self_attn.{proj}.bias": (d,)}
        shapes |= {f"{p}mlp.fc1.weight": (f, d), f"{p}mlp.fc1.bias": (f,),
                   f"{p}mlp.fc2.weight": (d, f), f"{p}mlp.fc2.bias": (d,)}
    return shapes


def expected_vision_shapes(img: ViTConfig, prefix: str = "vision_model.") -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF SigLIP vision tower under `prefix`, with its shape (its linear head excluded)."""
    d, p, v = img.width, img.patch_size, prefix
    shapes = {
        # SigLIP 2's is a linear layer over the flattened patch (rows, columns, channels).
        f"{v}embeddings.patch_embedding.weight": (d, p * p * 3) if img.naflex else (d, 3, p, p),
        f"{v}embeddings.patch_embedding.bias": (d,),
        f"{v}embeddings.position_embedding.weight": (img.num_patches, d),
        f"{v}post_layernorm.weight": (d,),
        f"{v}post_layernorm.bias": (d,),
        **_encoder_shapes(v, img.depth, d, img.mlp_dim),
    }
    if img.pool_type == "map":
        h = f"{v}head."
        shapes |= {
            f"{h}probe": (1, 1, d),
            f"{h}attention.in_proj_weight": (3 * d, d),
            f"{h}attention.in_proj_bias": (3 * d,),
            f"{h}attention.out_proj.weight": (d, d),
            f"{h}attention.out_proj.bias": (d,),
            f"{h}layernorm.weight": (d,),
            f"{h}layernorm.bias": (d,),
            f"{h}mlp.fc1.weight": (img.mlp_dim, d),
            f"{h}mlp.fc1.bias": (img.mlp_dim,),
            f"{h}mlp.fc2.weight": (d, img.mlp_dim),
            f"{h}mlp.fc2.bias": (d,),
        }
    return shapes


def expected_siglip_shapes(cfg: TwoTowersConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF SiglipModel checkpoint of `cfg` holds, with its shape."""
    txt = cfg.text
    shapes = expected_vision_shapes(cfg.image)
    d, t = txt.width, "text_model."
    shapes |= {
        f"{t}embeddings.token_embedding.weight": (txt.vocab_size, d),
        f"{t}embeddings.position_embedding.weight": (txt.max_len, d),
        f"{t}final_layer_norm.weight": (d,),
        f"{t}final_layer_norm.bias": (d,),
        f"{t}head.weight": (txt.head_size or d, d),
        f"{t}head.bias": (txt.head_size or d,),
        **_encoder_shapes(t, txt.depth, d, txt.mlp_dim),
        "logit_scale": (1,),
        "logit_bias": (1,),
    }
    return shapes


def check_siglip_state(state: Mapping[str, np.ndarray], cfg: TwoTowersConfig, source: str = "state dict",
                       where: Mapping[str, Any] | None = None) -> None:
    """Every expected tensor is present with its shape and nothing else is there (CheckpointError otherwise)."""
    expected = expected_siglip_shapes(cfg)
    check_tensor_shapes(state, expected, source, where)
    # position_ids are derived buffers (older transformers saved them); anything else is a feature we would drop.
    unexpected = sorted(n for n in state if n not in expected and not n.endswith("position_ids"))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {unexpected[:5]} (not part of a SiglipModel of this "
                              f"config; vision_use_head {cfg.image.pool_type == 'map'})")


# ---------------------------------------------------------------------------------------------- weights


def _ln(state: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {"scale": state[f"{name}.weight"], "bias": state[f"{name}.bias"]}


def _dense(state: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {"kernel": state[f"{name}.weight"].T, "bias": state[f"{name}.bias"]}


def _attn_from_hf(q: tuple, k: tuple, v: tuple, o: tuple, *, n: int) -> dict[str, Any]:
    """(weight [D, D], bias [D]) per projection -> query/key/value kernel [D, N, H] + bias [N, H], out [N, H, D]."""
    d = o[0].shape[0]
    h = d // n
    proj = lambda w, b: {"kernel": w.T.reshape(d, n, h), "bias": b.reshape(n, h)}  # noqa: E731
    return {"query": proj(*q), "key": proj(*k), "value": proj(*v),
            "out": {"kernel": o[0].T.reshape(n, h, d), "bias": o[1]}}


def _encoder_from_hf(state: Mapping[str, np.ndarray], prefix: str, depth: int, n: int, norm: str) -> dict[str, Any]:
    encoder: dict[str, Any] = {"encoder_norm": _ln(state, norm)}
    for i in range(depth):
        p = f"{prefix}encoder.layers.{i}."
        projs = [(state[f"{p}self_attn.{k}.weight"], state[f"{p}self_attn.{k}.bias"])
                 for k in ("q_proj", "k_proj", "v_proj", "out_proj")]
        encoder[f"encoderblock_{i}"] = {
            "LayerNorm_0": _ln(state, f"{p}layer_norm1"),
            "MultiHeadDotProductAttention_0": _attn_from_hf(*projs, n=n),
            "LayerNorm_1": _ln(state, f"{p}layer_norm2"),
            "MlpBlock_0": {"Dense_0": _dense(state, f"{p}mlp.fc1"), "Dense_1": _dense(state, f"{p}mlp.fc2")},
        }
    return encoder


def vision_params_from_hf(state: Mapping[str, np.ndarray], img_cfg: ViTConfig,
                          prefix: str = "vision_model.") -> dict[str, Any]:
    """Our ViT params (no `head`; blocks unrolled) from the HF vision tower under `prefix`. The caller checks the
    state first (names and shapes)."""
    v = prefix
    weight, p = state[f"{v}embeddings.patch_embedding.weight"], img_cfg.patch_size
    # [D, 3, p, p] (a convolution), or [D, p * p * 3] (SigLIP 2's linear layer): our kernel is [p, p, 3, D].
    kernel = weight.T.reshape(p, p, 3, -1) if img_cfg.naflex else weight.transpose(2, 3, 1, 0)
    img: dict[str, Any] = {
        "embedding": {"kernel": kernel, "bias": state[f"{v}embeddings.patch_embedding.bias"]},
        "pos_embedding": state[f"{v}embeddings.position_embedding.weight"][None],  # [1, P, D]
        "Transformer": _encoder_from_hf(state, v, img_cfg.depth, img_cfg.num_heads, f"{v}post_layernorm"),
    }
    if img_cfg.pool_type == "map":
        h = f"{v}head."
        wq, wk, wv = np.split(state[f"{h}attention.in_proj_weight"], 3)  # each [D, D]
        bq, bk, bv = np.split(state[f"{h}attention.in_proj_bias"], 3)
        projs = [(wq, bq), (wk, bk), (wv, bv), (state[f"{h}attention.out_proj.weight"],
                                                state[f"{h}attention.out_proj.bias"])]
        img["MAPHead_0"] = {
            "probe": state[f"{h}probe"],
            "MultiHeadDotProductAttention_0": _attn_from_hf(*projs, n=img_cfg.num_heads),
            "LayerNorm_0": _ln(state, f"{h}layernorm"),
            "MlpBlock_0": {"Dense_0": _dense(state, f"{h}mlp.fc1"), "Dense_1": _dense(state, f"{h}mlp.fc2")},
        }
    return img


def siglip_params_from_hf(state: Mapping[str, np.ndarray], cfg: TwoTowersConfig) -> dict[str, Any]:
    """Our params (blocks unrolled, dtype as stored) from an HF SiglipModel state dict (checked)."""
    check_siglip_state(state, cfg)
    txt_cfg = cfg.text
    img = vision_params_from_hf(state, cfg.image)
    t = "text_model."
    txt = {
        "Embed_0": {"embedding": state[f"{t}embeddings.token_embedding.weight"]},
        "pos_embedding": state[f"{t}embeddings.position_embedding.weight"][None],  # [1, L, D]
        "Encoder_0": _encoder_from_hf(state, t, txt_cfg.depth, txt_cfg.num_heads, f"{t}final_layer_norm"),
        "head": _dense(state, f"{t}head"),
    }
    return {"img": img, "txt": txt, "t": state["logit_scale"], "b": state["logit_bias"]}


def _np(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a))


def _ln_to_hf(ln: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
    return {f"{name}.weight": _np(ln["scale"]), f"{name}.bias": _np(ln["bias"])}


def _dense_to_hf(dense: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
    return {f"{name}.weight": _np(np.asarray(dense["kernel"]).T), f"{name}.bias": _np(dense["bias"])}


def _mlp_to_hf(mlp: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
    return _dense_to_hf(mlp["Dense_0"], f"{name}.fc1") | _dense_to_hf(mlp["Dense_1"], f"{name}.fc2")


def _attn_to_hf(attn: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Inverse of `_attn_from_hf`: projection name -> (weight [D, D], bias [D])."""
    out = {}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        kernel = np.asarray(attn[ours]["kernel"])  # [D, N, H]
        d = kernel.shape[0]
        out[theirs] = (_np(kernel.reshape(d, -1).T), _np(np.asarray(attn[ours]["bias"]).reshape(-1)))
    kernel = np.asarray(attn["out"]["kernel"])  # [N, H, D]
    out["out_proj"] = (_np(kernel.reshape(-1, kernel.shape[-1]).T), _np(attn["out"]["bias"]))
    return out


def _encoder_to_hf(encoder: Mapping[str, Any], prefix: str, depth: int, norm: str) -> dict[str, np.ndarray]:
    state = _ln_to_hf(encoder["encoder_norm"], norm)
    for i in range(depth):
        block, p = encoder[f"encoderblock_{i}"], f"{prefix}encoder.layers.{i}."
        state |= _ln_to_hf(block["LayerNorm_0"], f"{p}layer_norm1") | _ln_to_hf(block["LayerNorm_1"], f"{p}layer_norm2")
        for name, (w, b) in _attn_to_hf(block["MultiHeadDotProductAttention_0"]).items():
            state |= {f"{p}self_attn.{name}.weight": w, f"{p}self_attn.{name}.bias": b}
        state |= _mlp_to_hf(block["MlpBlock_0"], f"{p}mlp")
    return state


def vision_params_to_hf(img: Mapping[str, Any], img_cfg: ViTConfig,
                        prefix: str = "vision_model.") -> dict[str, np.ndarray]:
    """The HF vision tower tensors under `prefix` of our ViT params (either block layout; a `head` is left out);
    the exact inverse of `vision_params_from_hf`."""
    v = prefix
    img = relayout_vit(img, img_cfg, scan_layers=False)
    kernel = np.asarray(img["embedding"]["kernel"])  # [p, p, 3, D]
    state = {
        f"{v}embeddings.patch_embedding.weight": _np(kernel.reshape(-1, kernel.shape[-1]).T if img_cfg.naflex
                                                     else kernel.transpose(3, 2, 0, 1)),
        f"{v}embeddings.patch_embedding.bias": _np(img["embedding"]["bias"]),
        f"{v}embeddings.position_embedding.weight": _np(np.asarray(img["pos_embedding"])[0]),
        **_encoder_to_hf(img["Transformer"], v, img_cfg.depth, f"{v}post_layernorm"),
    }
    if img_cfg.pool_type == "map":
        head, h = img["MAPHead_0"], f"{v}head."
        attn = _attn_to_hf(head["MultiHeadDotProductAttention_0"])
        state |= {
            f"{h}probe": _np(head["probe"]),
            f"{h}attention.in_proj_weight": _np(np.concatenate([attn[k][0] for k in ("q_proj", "k_proj", "v_proj")])),
            f"{h}attention.in_proj_bias": _np(np.concatenate([attn[k][1] for k in ("q_proj", "k_proj", "v_proj")])),
            f"{h}attention.out_proj.weight": attn["out_proj"][0],
            f"{h}attention.out_proj.bias": attn["out_proj"][1],
            **_ln_to_hf(head["LayerNorm_0"], f"{h}layernorm"),
        }
        state |= _mlp_to_hf(head["MlpBlock_0"], f"{h}mlp")
    return state


def siglip_params_to_hf(params: Mapping[str, Any], cfg: TwoTowersConfig) -> dict[str, np.ndarray]:
    """The HF SiglipModel state dict of our params (either block layout); the exact inverse of the above."""
    siglip_config_to_hf(cfg)  # raises if HF cannot express the model
    params = relayout_two_towers(params, cfg, scan_layers=False)
    txt, t = params["txt"], "text_model."
    state = vision_params_to_hf(params["img"], cfg.image)
    state |= {
        f"{t}embeddings.token_embedding.weight": _np(txt["Embed_0"]["embedding"]),
        f"{t}embeddings.position_embedding.weight": _np(np.asarray(txt["pos_embedding"])[0]),
        **_encoder_to_hf(txt["Encoder_0"], t, cfg.text.depth, f"{t}final_layer_norm"),
        **_dense_to_hf(txt["head"], f"{t}head"),
        "logit_scale": _np(params["t"]),
        "logit_bias": _np(params["b"]),
    }
    return state


# ---------------------------------------------------------------------------------------------- files


def read_siglip_hf(folder: str | Path) -> tuple[TwoTowersConfig, dict[str, Any], dict[str, Any]]:
    """(config, params (blocks unrolled, dtype as stored), raw config.json) of an HF SiglipModel folder, every
    tensor checked."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    cfg = siglip_config_from_hf(hf, str(folder / "config.json"))
    state, where = read_folder_tensors(folder)
    check_siglip_state(state, cfg, str(folder), where)
    return cfg, siglip_params_from_hf(state, cfg), hf


def save_siglip_hf(folder: str | Path, cfg: TwoTowersConfig, params: Mapping[str, Any],
                   hf_config: Mapping[str, Any] | None = None, extra_files: Iterable[ExtraFile] = ()) -> Path:
    """Writes config.json (`hf_config`, else the one derived from `cfg`) and model.safetensors (float tensors as
    given)."""
    return write_hf_folder(folder, hf_config or siglip_config_to_hf(cfg), siglip_params_to_hf(params, cfg),
                           extra_files)
