"""Convert a llama.cpp GGUF checkpoint into a Hugging Face model folder.

`gguf_to_hf_folder` dequantises every tensor to float32, renames it to the key transformers uses, undoes
the layout changes llama.cpp's converter made, and writes `config.json` + `model.safetensors`. The result
holds exactly the tensors `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` would load, so the
rest of the project only ever loads plain HF folders. When the file describes a tokenizer, the folder also gets
the `tokenizer.json` + `tokenizer_config.json` that `gguf_tokenizer` builds from it (the ids of transformers'
GGUF tokenizer). Supported GGUF architectures: `gemma3` (written as `gemma3_text`) and `llama`. Needs only
`gguf`, `numpy`, `safetensors` and `tokenizers`, not torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file

from big_vision_lite.checkpoints.gguf import tokenizer as gguf_tokenizer
from big_vision_lite.checkpoints.gguf.reader import (
    GGUFConversionError,
    metadata_value,
    open_reader,
    read_gguf_metadata,
)
from big_vision_lite.utils.atomic import atomic_folder

# Bump whenever the output of the conversion (weights, config or tokenizer files) changes, so that caches written by
# older code are rebuilt. 2: tokenizer files.
CONVERTER_VERSION = 2
MARKER_FILE = "bvl_conversion.json"
WEIGHTS_FILE = "model.safetensors"

# GGUF leaf name -> transformers leaf name, for the tensors inside `blk.N.` / `model.layers.N.`.
_LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 normalises around both sub-blocks, so `ffn_norm` is the *pre*-feedforward norm here.
_GEMMA3_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# Gemma 3 constants that llama.cpp does not store: it hard-codes them in its gemma3 graph, and transformers'
# GGUF loader takes the same values from Gemma3TextConfig's defaults.
_GEMMA3_LOCAL_ROPE_THETA = 10_000.0
_GEMMA3_SLIDING_WINDOW_PATTERN = 6  # every 6th layer attends globally


class UnsupportedArchitectureError(GGUFConversionError):
    """The GGUF file's `general.architecture` is not one this converter handles."""


def gguf_to_hf_folder(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert `gguf_path` into an HF folder at `out_dir` (replacing any folder there) and return its path.

    The folder is built next to `out_dir` and renamed into place, so a crash never leaves a partial one.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = open_reader(gguf_path)
    architecture = metadata_value(reader, "general.architecture", gguf_path)
    if architecture not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{gguf_path}: GGUF architecture {architecture!r} is not supported; supported: {sorted(_ARCHITECTURES)}"
        )
    config_builder, layer_names, transform = _ARCHITECTURES[architecture]
    config = config_builder(reader, gguf_path)
    # Before the tensors, so an unsupported tokenizer fails fast.
    metadata = read_gguf_metadata(gguf_path)
    tokenizer = None
    if gguf_tokenizer.has_tokenizer(metadata):  # weights-only files describe none
        tokenizer = gguf_tokenizer.build_gguf_tokenizer(metadata, gguf_path)
    tensors = _convert_tensors(reader, gguf_path, layer_names, lambda name, w: transform(name, w, config))

    with atomic_folder(out_dir) as tmp_dir:
        # "format": "pt" is what transformers' safetensors loader expects in the header.
        save_file(tensors, tmp_dir / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            gguf_tokenizer.write_tokenizer_files(*tokenizer, tmp_dir)
        marker = {"converter_version": CONVERTER_VERSION, **_source_identity(gguf_path)}
        (tmp_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


def is_conversion_current(out_dir: str | Path, gguf_path: str | Path) -> bool:
    """Whether `out_dir` holds a conversion of this GGUF file made by the current converter version."""
    try:
        marker = json.loads((Path(out_dir) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    expected = {"converter_version": CONVERTER_VERSION, **_source_identity(Path(gguf_path))}
    return marker == expected and (Path(out_dir) / WEIGHTS_FILE).is_file()


def _source_identity(gguf_path: Path) -> dict[str, Any]:
    return {"source_name": gguf_path.name, "source_size": gguf_path.stat().st_size}


def _convert_tensors(
    reader: gguf.GGUFReader,
    gguf_path: Path,
    layer_names: dict[str, str],
    transform: Callable[[str, np.ndarray], np.ndarray],
) -> dict[str, np.ndarray]:
    tensors = {}
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name, layer_names)
        if hf_name is None:
            # Refusing beats silently dropping a weight the model would then run without.
            raise GGUFConversionError(f"{gguf_path}: GGUF tensor {tensor.name!r} has no known transformers name")
        try:
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise GGUFConversionError(f"{gguf_path}: tensor {tensor.name!r}: {e}") from e
        # np.array copies out of the memory map, so the saved arrays do not pin the file.
        tensors[hf_name] = np.array(transform(tensor.name, weights), dtype=np.float32)
    return tensors


def _hf_name(gguf_name: str, layer_names: dict[str, str]) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match[2] not in layer_names:
        return None
    return f"model.layers.{match[1]}.{layer_names[match[2]]}.weight"


def _common_config(reader: gguf.GGUFReader, gguf_path: Path, arch: str) -> dict[str, Any]:
    def key(name: str, *default: Any) -> Any:
        return metadata_value(reader, f"{arch}.{name}", gguf_path, *default)

    hidden_size = key("embedding_length")
    num_heads = key("attention.head_count")
    # llama.cpp's own fallback when the head width is not stated.
    head_dim = key("attention.key_length", hidden_size // num_heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise GGUFConversionError(f"{gguf_path}: partial rotary embeddings (rope.dimension_count) are not supported")
    if key("rope.scaling.type", "none") != "none":
        raise GGUFConversionError(f"{gguf_path}: rope scaling {key('rope.scaling.type')!r} is not supported")
    num_tokens = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    vocab_size = key("vocab_size", num_tokens)
    if vocab_size is None:
        raise GGUFConversionError(f"{gguf_path}: GGUF states no vocabulary size ({arch}.vocab_size or tokens)")
    tensor_names = {t.name for t in reader.tensors}
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": key("attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": key("context_length"),
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata_value(reader, "tokenizer.ggml.bos_token_id", gguf_path, None),
        "eos_token_id": metadata_value(reader, "tokenizer.ggml.eos_token_id", gguf_path, None),
        "pad_token_id": metadata_value(reader, "tokenizer.ggml.padding_token_id", gguf_path, None),
        "dtype": "float32",
    }


def _llama_config(reader: gguf.GGUFReader, gguf_path: Path) -> dict[str, Any]:
    common = _common_config(reader, gguf_path, "llama")
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **common,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": metadata_value(reader, "llama.rope.freq_base", gguf_path)},
    }


def _gemma3_config(reader: gguf.GGUFReader, gguf_path: Path) -> dict[str, Any]:
    common = _common_config(reader, gguf_path, "gemma3")
    num_layers = common["num_hidden_layers"]
    global_theta = metadata_value(reader, "gemma3.rope.freq_base", gguf_path)
    layer_types = [
        "full_attention" if (i + 1) % _GEMMA3_SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
        for i in range(num_layers)
    ]
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        **common,
        "hidden_activation": "gelu_pytorch_tanh",
        # llama.cpp scales queries by 1/sqrt(head_dim) (all sizes but 27B, whose GGUF we do not ship).
        "query_pre_attn_scalar": common["head_dim"],
        "sliding_window": metadata_value(reader, "gemma3.attention.sliding_window", gguf_path),
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": global_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_ROPE_THETA},
        },
        "attention_bias": False,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def _llama_transform(gguf_name: str, weights: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    # llama.cpp reorders each head's q/k rows from HF's half-split rotary layout to interleaved pairs
    # (row 2i, 2i+1 of a head <- rows i, i + d/2); undo it per head (kv heads for k).
    if gguf_name.endswith(".attn_q.weight"):
        return _unpermute_rotary_rows(weights, config["num_attention_heads"])
    if gguf_name.endswith(".attn_k.weight"):
        return _unpermute_rotary_rows(weights, config["num_key_value_heads"])
    return weights


def _unpermute_rotary_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    half = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _gemma3_transform(gguf_name: str, weights: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w so its generic norm applies. Every norm,
    # including the q/k norms, got the offset.
    if gguf_name.endswith("norm.weight"):
        return weights - np.float32(1.0)
    return weights


_ARCHITECTURES: dict[str, tuple[Callable, dict[str, str], Callable]] = {
    "gemma3": (_gemma3_config, _GEMMA3_LAYER_NAMES, _gemma3_transform),
    "llama": (_llama_config, _LLAMA_LAYER_NAMES, _llama_transform),
}
