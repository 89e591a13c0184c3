"""Published model sizes as presets, each written as the config.json transformers reads for it (from public facts:
the released configs and model cards), turned into our config by the same converters that read HF folders.

Nothing is downloaded or allocated: `parameter_count` builds our parameter tree abstractly (`jax.eval_shape`), and
the tests build transformers' model of the same config.json on PyTorch's meta device and match every tensor's name
and shape. `published` is the size its publisher states, with where it was read (`published_by`).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from big_vision_lite.checkpoints.hf_paligemma import paligemma_config_from_hf
from big_vision_lite.checkpoints.hf_siglip import siglip_config_from_hf
from big_vision_lite.models import paligemma, two_towers

KERAS_HUB = "keras-hub preset metadata"

# SigLIP So400m/14: 1152 wide, 27 blocks, MLP 4304, 16 heads, in both towers.
_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
# PaliGemma's vocabulary: Gemma's 256000 + 1024 location + 128 segmentation tokens, padded to 257216.
_PALIGEMMA_VOCAB, _IMAGE_TOKEN = 257216, 257152
_GEMMA_2B = dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                 num_attention_heads=8, num_key_value_heads=1, head_dim=256)
_GEMMA2 = dict(model_type="gemma2", head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
_GEMMA2_SIZES = {
    "3b": dict(_GEMMA2, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
               num_key_value_heads=4),
    "10b": dict(_GEMMA2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                num_key_value_heads=8),
    "28b": dict(_GEMMA2, hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
}
# keras-hub's published sizes count the tokenizer's vocabulary, 64 rows fewer than transformers' embeddings (PaliGemma
# 257152 of 257216, Gemma 3 262144 of 262208: its MedGemma entries, with all 262208 rows, equal our Gemma 3 4B and
# 27B counts exactly); it gives one 28B PaliGemma 2 size for every resolution.
_PUBLISHED = {
    "paligemma-3b-224": 2_923_335_408, "paligemma-3b-448": 2_924_220_144, "paligemma-3b-896": 2_927_759_088,
    "paligemma2-3b-224": 3_032_094_960, "paligemma2-3b-448": 3_032_979_696, "paligemma2-3b-896": 3_036_518_640,
    "paligemma2-10b-224": 9_662_409_456, "paligemma2-10b-448": 9_663_294_192, "paligemma2-10b-896": 9_666_833_136,
    "paligemma2-28b-224": 27_650_192_112, "paligemma2-28b-448": 27_650_192_112,
    "paligemma2-28b-896": 27_650_192_112,
    "siglip-so400m-14-224": 877_360_578, "siglip-so400m-14-384": 877_961_291,
    # keras-hub's fixed-resolution SigLIP 2 at 256 px: the NaFlex models' tensors (a 16 x 16 position grid).
    "siglip2-so400m-16-naflex": 1_135_671_282, "siglip2-b-16-naflex": 375_234_370,
    "gemma3-4b": 4_299_915_632, "gemma3-12b": 12_187_079_280, "gemma3-27b": 27_432_062_576,
}
# Gemma 3's decoders: five sliding (1024-token window, RoPE base 10k) layers per global one (base 1M, linear x8).
_GEMMA3 = dict(model_type="gemma3_text", vocab_size=262208, head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
               hidden_activation="gelu_pytorch_tanh",
               sliding_window=1024, rope_parameters={
                   "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
_GEMMA3_SIZES = {
    "4b": dict(_GEMMA3, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
               num_key_value_heads=4),
    "12b": dict(_GEMMA3, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                num_key_value_heads=8),
    "27b": dict(_GEMMA3, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "siglip" or "paligemma" (`checkpoints.KINDS`; Gemma 3 with vision is PaliGemma's kind)
    hf_config: Mapping[str, Any]  # the config.json transformers builds the model from
    published: int
    published_by: str = KERAS_HUB

    def config(self) -> Any:
        """Our config of this preset (the converters that read HF folders)."""
        source = f"preset {self.name}"
        if self.kind == "paligemma":
            return paligemma_config_from_hf(self.hf_config, source)
        return siglip_config_from_hf(self.hf_config, source)


def _paligemma(name: str, text: Mapping[str, Any], image_size: int) -> Preset:
    vision = dict(_SO400M, patch_size=14, image_size=image_size, vision_use_head=False)
    hf = {"model_type": "paligemma", "vision_config": vision,
          "text_config": dict(text, vocab_size=_PALIGEMMA_VOCAB), "projection_dim": text["hidden_size"],
          "image_token_index": _IMAGE_TOKEN}
    return Preset(name, "paligemma", hf, _PUBLISHED[name])


def _gemma3(size: str) -> Preset:
    text = dict(_GEMMA3_SIZES[size])
    text["layer_types"] = [("full" if (i + 1) % 6 == 0 else "sliding") + "_attention"
                           for i in range(text["num_hidden_layers"])]
    vision = dict(_SO400M, patch_size=14, image_size=896, vision_use_head=False)
    hf = {"model_type": "gemma3", "text_config": text, "vision_config": vision, "mm_tokens_per_image": 256,
          "image_token_index": 262144, "boi_token_index": 255999, "eoi_token_index": 256000}
    return Preset(f"gemma3-{size}", "paligemma", hf, _PUBLISHED[f"gemma3-{size}"])


def _siglip2_naflex(name: str, sizes: Mapping[str, int]) -> Preset:
    """SigLIP 2 NaFlex: a 16 x 16 position grid of 16-px patches, Gemma's 256000-token vocabulary, 64 text tokens."""
    hf = {"model_type": "siglip2", "vision_config": dict(sizes, patch_size=16, num_patches=256),
          "text_config": dict(sizes, vocab_size=256000, max_position_embeddings=64,
                              projection_size=sizes["hidden_size"])}
    return Preset(name, "siglip", hf, _PUBLISHED[name])


def _siglip(name: str, image_size: int, text_len: int) -> Preset:
    hf = {"model_type": "siglip", "vision_config": dict(_SO400M, patch_size=14, image_size=image_size),
          "text_config": dict(_SO400M, vocab_size=32000, max_position_embeddings=text_len, projection_size=1152)}
    return Preset(name, "siglip", hf, _PUBLISHED[name])


PRESETS: dict[str, Preset] = {p.name: p for p in [
    *(_paligemma(f"paligemma-3b-{px}", _GEMMA_2B, px) for px in (224, 448, 896)),
    *(_paligemma(f"paligemma2-{size}-{px}", text, px) for size, text in _GEMMA2_SIZES.items()
      for px in (224, 448, 896)),
    *(_gemma3(size) for size in _GEMMA3_SIZES),
    _siglip("siglip-so400m-14-224", 224, 16),
    _siglip("siglip-so400m-14-384", 384, 64),
    _siglip2_naflex("siglip2-so400m-16-naflex", _SO400M),
    _siglip2_naflex("siglip2-b-16-naflex", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                 num_attention_heads=12)),
]}


def abstract_params(preset: Preset) -> Any:
    """Our parameter tree of `preset` as shapes and dtypes only (nothing allocated), layers stacked."""
    cfg = preset.config()
    rng = jax.random.PRNGKey(0)
    if preset.kind == "paligemma":
        module = paligemma.PaliGemma(cfg, scan_layers=True)
        return jax.eval_shape(lambda: paligemma.init_params(module, rng))
    module = two_towers.TwoTowers(cfg, scan_layers=True)
    return jax.eval_shape(lambda: two_towers.init_params(module, rng))


def parameter_count(preset: Preset) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract_params(preset)))
