"""A decoder's LoRA adapters as PEFT adapter files (`adapter_config.json` + `adapter_model.safetensors`), and back.

Axis letters: G adapter groups of one projection (heads N or K; 1 for the MLP and the output projection), I the
projection's input width, O its output width per group, L our rank, R the PEFT rank.

Our adapters are per group (`models.lora`): q_einsum [N, D, H] has A [N, D, L] and B [N, L, H], one rank-L
adapter per head. PEFT holds one adapter per transformers module, dW = B_p @ A_p with A_p [R, I] and B_p [O_total,
R]. Per-group adapters are exactly one adapter of rank G * L whose B_p is block-diagonal (group g's rows only see
group g's ranks), so the export is lossless. PEFT's config has one rank for every module: smaller adapters (the
MLP's rank L) are padded with zero ranks to R = the largest G * L, which add nothing. PEFT scales by
lora_alpha / R, so lora_alpha = our scale * R.

Modules are transformers' names under `module_prefix` (e.g. `model.language_model.` for PaliGemma):
`layers.{i}.self_attn.{q,k,v,o}_proj` and `layers.{i}.mlp.{gate,up,down}_proj`; tensors are named
`base_model.model.{module}.lora_{A,B}.weight`, as PEFT saves them.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from big_vision_lite.checkpoints.files import CheckpointError
from big_vision_lite.models.gemma import DecoderConfig, relayout_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _block_diagonal(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group adapters a [G, I, L], b [G, L, O] -> PEFT's A_p [G*L, I] and block-diagonal B_p [G*O, G*L]."""
    groups, _, rank = a.shape
    out = b.shape[-1]
    a_p = a.transpose(0, 2, 1).reshape(groups * rank, a.shape[1])
    b_p = np.zeros((groups * out, groups * rank), b.dtype)
    for g in range(groups):
        b_p[g * out:(g + 1) * out, g * rank:(g + 1) * rank] = b[g].T
    return a_p, b_p


def _groups(a_p: np.ndarray, b_p: np.ndarray, groups: int, rank: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_block_diagonal` (after dropping the zero padding ranks); refuses adapters that are not
    block-diagonal, which our per-group layout cannot hold."""
    out = b_p.shape[0] // groups
    used = groups * rank
    if np.any(a_p[used:]) or np.any(b_p[:, used:]):
        raise CheckpointError(f"{name}: nonzero weights beyond rank {used}; not an adapter this package wrote")
    a = a_p[:used].reshape(groups, rank, -1).transpose(0, 2, 1)
    b = np.stack([b_p[g * out:(g + 1) * out, g * rank:(g + 1) * rank].T for g in range(groups)])
    mask = np.kron(np.eye(groups, dtype=bool), np.ones((out, rank), bool))
    if np.any(b_p[:, :used][~mask]):
        raise CheckpointError(f"{name}: lora_B is not block-diagonal per head; our adapters cannot hold it")
    return a, b


def _layer_adapters(layer: Mapping[str, Any], cfg: DecoderConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One unrolled layer's adapters as per-group (a [G, I, L], b [G, L, O]) by transformers module name."""
    attn, mlp = layer["attn"], layer["mlp"]
    ab = lambda p: (np.asarray(p["lora_a"]), np.asarray(p["lora_b"]))  # noqa: E731
    if "qkv_einsum" in attn:
        a, b = ab(attn["qkv_einsum"])  # [3, N, D, L], [3, N, L, H]
        found = {"self_attn.q_proj": (a[0], b[0]), "self_attn.k_proj": (a[1], b[1]), "self_attn.v_proj": (a[2], b[2])}
    else:
        (qa, qb), (kva, kvb) = ab(attn["q_einsum"]), ab(attn["kv_einsum"])  # [N, D, L], [2, K, D, L] ...
        found = {"self_attn.q_proj": (qa, qb), "self_attn.k_proj": (kva[0], kvb[0]),
                 "self_attn.v_proj": (kva[1], kvb[1])}
    a, b = ab(attn["attn_vec_einsum"])  # [N, H, L], [L, D]: one adapter over the N * H inputs
    found["self_attn.o_proj"] = (a.reshape(1, cfg.num_heads * cfg.head_dim, -1), b[None])
    a, b = np.asarray(mlp["gating_einsum_lora_a"]), np.asarray(mlp["gating_einsum_lora_b"])  # [2, D, L], [2, L, F]
    found["mlp.gate_proj"], found["mlp.up_proj"] = (a[:1], b[:1]), (a[1:], b[1:])
    found["mlp.down_proj"] = (np.asarray(mlp["linear_lora_a"])[None], np.asarray(mlp["linear_lora_b"])[None])
    return found


def adapter_names(params: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every adapter tensor (`lora_a`/`lora_b`) in a params tree, by its path."""
    names = []
    for key, value in params.items():
        if isinstance(value, Mapping):
            names += adapter_names(value, f"{prefix}{key}/")
        elif key.endswith(("lora_a", "lora_b")):
            names.append(prefix + key)
    return names


def peft_state(params: Mapping[str, Any], cfg: DecoderConfig, module_prefix: str) -> tuple[dict[str, np.ndarray],
                                                                                          dict[str, Any]]:
    """(adapter tensors by PEFT name, adapter_config.json fields) of a decoder's params carrying LoRA (`cfg.lora`)."""
    if cfg.lora is None:
        raise ValueError("the decoder has no LoRA adapters to export (its config has no lora)")
    if cfg.lora.rslora:
        raise ValueError("rsLoRA adapters: export them merged (PEFT's rsLoRA scale is alpha / sqrt(R) of the padded "
                         "rank R, not of ours)")
    layers = relayout_layers(dict(params), cfg.depth, scan_layers=False)
    per_module = {f"{module_prefix}layers.{i}.{name}": _block_diagonal(a, b)
                  for i in range(cfg.depth) for name, (a, b) in _layer_adapters(layers[f"layers_{i}"], cfg).items()}
    rank = max(a_p.shape[0] for a_p, _ in per_module.values())
    state = {}
    for module, (a_p, b_p) in per_module.items():
        pad = rank - a_p.shape[0]
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.pad(a_p, [(0, pad), (0, 0)]))
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(np.pad(b_p, [(0, 0), (0, pad)]))
    config = {"peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": cfg.lora.scale * rank,
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": None, "modules_to_save": None,
              # Full-match regex: the decoder's projections only (a vision tower has q_proj/k_proj/v_proj too).
              "target_modules": rf"{re.escape(module_prefix)}layers\.\d+\.(self_attn|mlp)\.({'|'.join(TARGETS)})"}
    return state, config


def write_peft_files(folder: Path, state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
    """Writes the two PEFT files into an existing `folder` (the caller makes the folder appear atomically)."""
    (folder / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2))
    save_file(dict(state), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_peft_adapters(folder: Path, cfg: DecoderConfig, module_prefix: str, rank: int) -> list[dict[str, Any]]:
    """PEFT files written by `write_peft_files` -> per layer, {transformers module name: (a, b)} in our per-group
    layout (rank `rank` each), for checking an export against the adapters it came from."""
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    groups = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads,
              "self_attn.v_proj": cfg.num_kv_heads, "self_attn.o_proj": 1, "mlp.gate_proj": 1, "mlp.up_proj": 1,
              "mlp.down_proj": 1}
    layers = []
    for i in range(cfg.depth):
        found = {}
        for name, count in groups.items():
            key = f"{PEFT_PREFIX}{module_prefix}layers.{i}.{name}"
            if f"{key}.lora_A.weight" not in state:
                raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: no adapter for {key}")
            found[name] = _groups(state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"], count, rank, key)
        layers.append(found)
    return layers


def expected_adapters(params: Mapping[str, Any], cfg: DecoderConfig) -> list[dict[str, Any]]:
    """Our params' adapters in the per-layer form `read_peft_adapters` returns."""
    layers = relayout_layers(dict(params), cfg.depth, scan_layers=False)
    return [_layer_adapters(layers[f"layers_{i}"], cfg) for i in range(cfg.depth)]
