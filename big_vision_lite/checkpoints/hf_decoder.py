"""Hugging Face decoder folders (config.json + *.safetensors) <-> `DecoderConfig` and our params pytree.

Supported `model_type`s: gemma, gemma2, gemma3_text, llama, qwen3. Both config styles are read: transformers
5.x (`rope_parameters`, per layer type for Gemma 3; `layer_types`) and 4.x (`rope_theta`, `rope_scaling`,
`rope_local_base_freq`, `sliding_window_pattern`). Conversions are pure transposes and reshapes, so
HF -> ours -> HF returns the same bytes.

HF weight layouts (torch Linear is [out, in]): q_proj [N*H, D], k_proj/v_proj [K*H, D], o_proj [D, N*H],
gate_proj/up_proj [F, D], down_proj [D, F], embed_tokens/lm_head [V, D], norms [D] (q_norm/k_norm [H]).
"""

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
from big_vision_lite.models.gemma import DecoderConfig, relayout_layers

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "llama", "qwen3")
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


# ---------------------------------------------------------------------------------------------- config


def _rope(hf: dict[str, Any], layer_type: str) -> tuple[float, float]:
    """(theta, linear scale) of one layer type from either config style."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:  # 5.x, per layer type
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:  # 5.x
        theta, scaling = params["rope_theta"], params
    else:  # 4.x
        theta = hf.get("rope_theta", 10_000.0)
        if layer_type == "sliding_attention" and hf.get("rope_local_base_freq") is not None:
            theta, scaling = hf["rope_local_base_freq"], None  # 4.x scaled only the global layers
        else:
            scaling = hf.get("rope_scaling")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return float(theta), 1.0
    if rope_type == "linear":
        return float(theta), float(scaling["factor"])
    raise CheckpointError(f"config.json: rope type {rope_type!r} is not supported (supported: default, linear)")


def _layer_types(hf: dict[str, Any], model_type: str, depth: int) -> tuple[str, ...] | None:
    if hf.get("layer_types"):
        unknown = set(hf["layer_types"]) - set(_LAYER_TYPES)
        if unknown:
            raise CheckpointError(f"config.json: unknown layer_types {sorted(unknown)}; known: {sorted(_LAYER_TYPES)}")
        types = tuple(_LAYER_TYPES[t] for t in hf["layer_types"])
    elif model_type == "gemma2":
        types = tuple("sliding" if i % 2 == 0 else "full" for i in range(depth))
    elif model_type == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", 6)
        types = tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(depth))
    else:
        return None
    return types if "sliding" in types else None


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> DecoderConfig:
    """Our `DecoderConfig` from a transformers config dict (either 4.x or 5.x style)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported")
    try:
        width, depth, heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
        act_name = hf.get("hidden_activation") or hf.get("hidden_act")
        if act_name not in _ACTIVATIONS:
            raise CheckpointError(
                f"{source}: activation {act_name!r} is not supported; supported: {sorted(_ACTIVATIONS)}"
            )
        is_gemma = model_type.startswith("gemma")
        layer_types = _layer_types(hf, model_type, depth)
        theta, scale = _rope(hf, "full_attention")
        local_theta, local_scale = _rope(hf, "sliding_attention")
        return DecoderConfig(
            family=model_type,
            vocab_size=hf["vocab_size"],
            width=width,
            depth=depth,
            mlp_dim=hf["intermediate_size"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or width // heads,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            norm_plus_one=is_gemma,
            activation=_ACTIVATIONS[act_name],
            scale_embeddings=is_gemma,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            post_norms=model_type in ("gemma2", "gemma3_text"),
            qk_norm=model_type in ("gemma3_text", "qwen3"),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            layer_types=layer_types,
            sliding_window=hf.get("sliding_window") if layer_types else None,
            rope_theta=theta,
            rope_scale=scale,
            local_rope_theta=local_theta if layer_types else None,
            local_rope_scale=local_scale if layer_types else 1.0,
            max_positions=hf.get("max_position_embeddings"),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: required field {e.args[0]!r} is missing") from None


def config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    """A transformers 5.x config dict for `cfg` (what `save_hf` writes when no original config is given)."""
    model_type = cfg.family
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"DecoderConfig.family {model_type!r} has no HF model_type; supported: {SUPPORTED_MODEL_TYPES}"
        )
    arch = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3", "llama": "Llama", "qwen3": "Qwen3"}
    hf: dict[str, Any] = {
        "architectures": [f"{arch[model_type]}ForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.depth,
        "intermediate_size": cfg.mlp_dim,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.max_positions is not None:
        hf["max_position_embeddings"] = cfg.max_positions
    act = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}[cfg.activation]
    hf["hidden_activation" if model_type.startswith("gemma") else "hidden_act"] = act

    def rope(theta: float, scale: float) -> dict[str, Any]:
        if scale == 1.0:
            return {"rope_type": "default", "rope_theta": theta}
        return {"rope_type": "linear", "rope_theta": theta, "factor": scale}

    if cfg.layer_types is not None:
        hf["layer_types"] = [f"{t}_attention" for t in cfg.layer_types]
        hf["sliding_window"] = cfg.sliding_window
    if model_type == "gemma3_text":
        local = rope(cfg.local_rope_theta or cfg.rope_theta, cfg.local_rope_scale)
        hf["rope_parameters"] = {"full_attention": rope(cfg.rope_theta, cfg.rope_scale), "sliding_attention": local}
    else:
        hf["rope_parameters"] = rope(cfg.rope_theta, cfg.rope_scale)
    if model_type in ("gemma2", "gemma3_text"):
        hf["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar or cfg.head_dim
        hf["attn_logit_softcapping"] = cfg.attn_logit_softcap
        hf["final_logit_softcapping"] = cfg.final_logit_softcap
    return hf


# ---------------------------------------------------------------------------------------------- weights


def _layer_names(cfg: DecoderConfig) -> dict[str, str]:
    """Our norm names -> HF's, per family (Gemma 1/Llama call the pre-MLP norm "post_attention_layernorm")."""
    if cfg.post_norms:
        return {
            "pre_attention_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "pre_ffw_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        }
    return {"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"}


def expected_hf_shapes(cfg: DecoderConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Every tensor name an HF checkpoint of `cfg` must hold, with its shape."""
    n, k, h, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width, cfg.mlp_dim
    shapes = {f"{prefix}embed_tokens.weight": (cfg.vocab_size, d), f"{prefix}norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.depth):
        p = f"{prefix}layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (n * h, d),
            p + "self_attn.k_proj.weight": (k * h, d),
            p + "self_attn.v_proj.weight": (k * h, d),
            p + "self_attn.o_proj.weight": (d, n * h),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (h,)}
        shapes |= {p + hf_name + ".weight": (d,) for hf_name in _layer_names(cfg).values()}
    return shapes


def params_from_hf(state: Mapping[str, np.ndarray], cfg: DecoderConfig, prefix: str = "model.") -> dict[str, Any]:
    """Our params (unrolled layout: `layers_0 ... layers_{L-1}`) from an HF state dict."""
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
    embedder = {"input_embedding": state[f"{prefix}embed_tokens.weight"]}
    if not cfg.tie_embeddings:
        embedder["output_embedding"] = state["lm_head.weight"]
    params: dict[str, Any] = {"embedder": embedder, "final_norm": {"scale": state[f"{prefix}norm.weight"]}}
    for i in range(cfg.depth):
        get = lambda name, i=i: state[f"{prefix}layers.{i}.{name}.weight"]  # noqa: E731
        q = get("self_attn.q_proj").reshape(n, h, d).transpose(0, 2, 1)  # [N, D, H]
        kk = get("self_attn.k_proj").reshape(k, h, d).transpose(0, 2, 1)  # [K, D, H]
        v = get("self_attn.v_proj").reshape(k, h, d).transpose(0, 2, 1)
        attn: dict[str, Any] = {"attn_vec_einsum": {"w": get("self_attn.o_proj").T.reshape(n, h, d)}}  # [N, H, D]
        if n == k:
            attn["qkv_einsum"] = {"w": np.stack([q, kk, v])}  # [3, N, D, H]
        else:
            attn["q_einsum"] = {"w": q}
            attn["kv_einsum"] = {"w": np.stack([kk, v])}  # [2, K, D, H]
        if cfg.qk_norm:
            attn["query_norm"] = {"scale": get("self_attn.q_norm")}
            attn["key_norm"] = {"scale": get("self_attn.k_norm")}
        layer = {
            "attn": attn,
            "mlp": {
                "gating_einsum": np.stack([get("mlp.gate_proj").T, get("mlp.up_proj").T]),  # [2, D, F]
                "linear": get("mlp.down_proj").T,  # [F, D]
            },
        }
        layer |= {ours: {"scale": get(theirs)} for ours, theirs in _layer_names(cfg).items()}
        params[f"layers_{i}"] = layer
    return params


def params_to_hf(params: Mapping[str, Any], cfg: DecoderConfig, prefix: str = "model.") -> dict[str, np.ndarray]:
    """The HF state dict of our params (either layout); the exact inverse of `params_from_hf`."""
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
    as_np = lambda a: np.ascontiguousarray(np.asarray(a))  # noqa: E731
    state = {f"{prefix}embed_tokens.weight": as_np(params["embedder"]["input_embedding"]),
             f"{prefix}norm.weight": as_np(params["final_norm"]["scale"])}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = as_np(params["embedder"]["output_embedding"])
    params = relayout_layers(dict(params), cfg.depth, scan_layers=False)
    for i in range(cfg.depth):
        layer, p = params[f"layers_{i}"], f"{prefix}layers.{i}."
        attn = layer["attn"]
        if n == k:
            q, kk, v = np.asarray(attn["qkv_einsum"]["w"])
        else:
            q = np.asarray(attn["q_einsum"]["w"])
            kk, v = np.asarray(attn["kv_einsum"]["w"])
        state[p + "self_attn.q_proj.weight"] = as_np(q.transpose(0, 2, 1).reshape(n * h, d))
        state[p + "self_attn.k_proj.weight"] = as_np(kk.transpose(0, 2, 1).reshape(k * h, d))
        state[p + "self_attn.v_proj.weight"] = as_np(v.transpose(0, 2, 1).reshape(k * h, d))
        state[p + "self_attn.o_proj.weight"] = as_np(np.asarray(attn["attn_vec_einsum"]["w"]).reshape(n * h, d).T)
        if cfg.qk_norm:
            state[p + "self_attn.q_norm.weight"] = as_np(attn["query_norm"]["scale"])
            state[p + "self_attn.k_norm.weight"] = as_np(attn["key_norm"]["scale"])
        gate, up = np.asarray(layer["mlp"]["gating_einsum"])
        state[p + "mlp.gate_proj.weight"] = as_np(gate.T)
        state[p + "mlp.up_proj.weight"] = as_np(up.T)
        state[p + "mlp.down_proj.weight"] = as_np(np.asarray(layer["mlp"]["linear"]).T)
        for ours, theirs in _layer_names(cfg).items():
            state[p + theirs + ".weight"] = as_np(layer[ours]["scale"])
    return state


# ---------------------------------------------------------------------------------------------- folders


def read_decoder_hf(folder: str | Path) -> tuple[DecoderConfig, dict[str, Any], dict[str, Any]]:
    """(config, params (unrolled layout, dtype as stored), raw config.json) of an HF decoder folder, every tensor
    checked."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    cfg = config_from_hf(hf, str(folder / "config.json"))
    state, where = read_folder_tensors(folder)
    prefix = "model." if "model.embed_tokens.weight" in state else ""
    expected = expected_hf_shapes(cfg, prefix)
    check_tensor_shapes(state, expected, str(folder), where)
    # A tied head may still be stored; rotary buffers are derived. Anything else is a feature we would drop.
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(n for n in state if n not in expected and n not in ignorable and "rotary_emb" not in n)
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensors {unexpected[:5]} (not used by {cfg.family})")
    return cfg, params_from_hf(state, cfg, prefix), hf


def save_decoder_hf(folder: str | Path, cfg: DecoderConfig, params: Mapping[str, Any],
                    hf_config: Mapping[str, Any] | None = None, extra_files: Iterable[ExtraFile] = ()) -> Path:
    """Writes config.json (`hf_config`, else the one derived from `cfg`) and model.safetensors."""
    return write_hf_folder(folder, hf_config or config_to_hf(cfg), params_to_hf(params, cfg), extra_files)
