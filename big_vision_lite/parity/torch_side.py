"""The PyTorch side of every parity check and benchmark: transformers models loaded from the same files as ours,
the hooks that record a decoder's stages, and greedy generation without early stop.

torch is imported inside the functions: the rest of the package (and our side of a parity run) runs without it.
"""

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from big_vision_lite.checkpoints.packaged import is_packaged_name, packaged_gguf_path
from big_vision_lite.utils.dtypes import dtype_name

# The transformers class of each model kind (`checkpoints.KINDS`).
REFERENCE_CLASSES = {"decoder": "AutoModelForCausalLM", "siglip": "AutoModel",  # SiglipModel or Siglip2Model
                     "paligemma": "AutoModelForImageTextToText"}  # PaliGemma or Gemma 3 with vision


def torch_dtype(dtype: Any) -> Any:
    """The torch dtype of `dtype` (a name or a jnp dtype, see utils.dtypes)."""
    import torch

    return getattr(torch, dtype_name(dtype))


def load_reference(kind: str, name_or_path: str | Path, dtype: Any, attn_implementation: str = "eager") -> Any:
    """The transformers model of `kind` for the same weights, in eval mode: a packaged decoder from its GGUF file
    (what transformers itself reads), anything else from its HF folder."""
    import transformers

    model_class = getattr(transformers, REFERENCE_CLASSES[kind])
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "attn_implementation": attn_implementation}
    name = str(name_or_path)
    if is_packaged_name(name):
        gguf = packaged_gguf_path(name)
        model = model_class.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    else:
        model = model_class.from_pretrained(name, **kwargs)
    return model.eval()


def reference_in_dtype(model: Any, dtype: Any) -> Any:
    """`model` (a transformers model from `load_reference`) rebuilt in `dtype`, eval mode: its class from the same
    config, the state dict cast on loading, as `from_pretrained(..., dtype=dtype)` builds it. For a packaged
    decoder this saves a second read of the GGUF file (transformers parses its whole vocabulary twice per load:
    ~25 s for Gemma 3 270M); tests/test_real_models.py checks parameters, buffers and logits equal to a fresh
    `load_reference` in bfloat16."""
    attn = model.config._attn_implementation
    rebuilt = type(model)._from_config(model.config, dtype=torch_dtype(dtype), attn_implementation=attn)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    return rebuilt.eval()


def to_numpy(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    """torch tensors (any dtype) -> float32 numpy arrays."""
    return {k: v.detach().float().numpy() for k, v in tensors.items()}


def pixels_nchw(images: np.ndarray, dtype: Any) -> Any:
    """Images [B, R, R, 3] (ours, channels last) as the torch tensor [B, 3, R, R] transformers takes."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dtype)


def long_tensor(a: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.asarray(a, np.int64))


@contextlib.contextmanager
def capture_decoder_stages(body: Any) -> Iterator[dict[str, Any]]:
    """While open, records into the yielded dict the input of `body.layers[0]` (`embeddings`), each layer's output
    (`layer_i`) and the final norm's (`final_norm`) of a transformers decoder body (torch tensors)."""
    captured: dict[str, Any] = {}

    def first(value: Any) -> Any:
        return value[0] if isinstance(value, tuple) else value

    def grab_input(_module: Any, args: tuple, kwargs: dict) -> None:
        captured["embeddings"] = args[0] if args else kwargs["hidden_states"]

    hooks = [body.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
    for i, layer in enumerate(body.layers):
        record = lambda _m, _a, out, i=i: captured.__setitem__(f"layer_{i}", first(out))  # noqa: E731
        hooks.append(layer.register_forward_hook(record))
    hooks.append(body.norm.register_forward_hook(lambda _m, _a, out: captured.__setitem__("final_norm", out)))
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def capture_layer_substages(layer: Any) -> Iterator[dict[str, Any]]:
    """While open, records into the yielded dict the sub-stages of one transformers decoder layer (Gemma 1/2/3,
    Llama, Qwen3), named as our `Block` sows them (torch tensors, transformers' layouts: q/k/v [B, N|K, T, H],
    logits/probs [B, N, T, S]): `normed`, `q` and `k` after RoPE, `v`, `logits` = q k^T * scaling and
    `logits_capped` (transformers computes both inside its eager attention without exposing them: they are
    recomputed here from its own q, k, scaling and soft-cap, in its op order), `probs`, `attn_out`,
    `post_attn_normed`, `residual_attn`, `ffw_normed`, `mlp_gate` (before the activation), `mlp_hidden`, `mlp_out`,
    `post_ffw_normed` and `output`.

    The attention's inputs come from wrapping the eager attention function of the layer's modeling module (the
    name its attention looks up at call time); everything else from forward hooks. Gemma 2/3 name their post-
    attention norm `post_attention_layernorm` and their pre-MLP norm `pre_feedforward_layernorm`; Gemma 1, Llama
    and Qwen3 have no post norms and call their pre-MLP norm `post_attention_layernorm`.
    """
    import torch
    from transformers.models.llama.modeling_llama import repeat_kv

    captured: dict[str, Any] = {}
    modeling = sys.modules[type(layer.self_attn).__module__]
    eager = modeling.eager_attention_forward

    def recording_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        out, probs = eager(module, query, key, value, attention_mask, **kwargs)
        if module is layer.self_attn:
            logits = torch.matmul(query, repeat_kv(key, module.num_key_value_groups).transpose(2, 3))
            logits = logits * (kwargs.get("scaling") or module.head_dim**-0.5)
            capped = logits
            if (cap := kwargs.get("softcap")) is not None:
                capped = torch.tanh(logits / cap) * cap
            captured.update(q=query, k=key, v=value, logits=logits, logits_capped=capped, probs=probs)
        return out, probs

    post_norms = hasattr(layer, "pre_feedforward_layernorm")
    pre_mlp_norm = layer.pre_feedforward_layernorm if post_norms else layer.post_attention_layernorm
    store = lambda name: lambda _m, _a, out: captured.__setitem__(name, out)  # noqa: E731
    store_input = lambda name: lambda _m, args: captured.__setitem__(name, args[0])  # noqa: E731
    hooks = [layer.input_layernorm.register_forward_hook(store("normed")),
             layer.self_attn.o_proj.register_forward_hook(store("attn_out")),
             pre_mlp_norm.register_forward_pre_hook(store_input("residual_attn")),
             pre_mlp_norm.register_forward_hook(store("ffw_normed")),
             layer.mlp.gate_proj.register_forward_hook(store("mlp_gate")),
             layer.mlp.down_proj.register_forward_pre_hook(store_input("mlp_hidden")),
             layer.mlp.register_forward_hook(store("mlp_out")),
             layer.register_forward_hook(lambda _m, _a, out: captured.__setitem__(
                 "output", out[0] if isinstance(out, tuple) else out))]
    if post_norms:
        hooks += [layer.post_attention_layernorm.register_forward_hook(store("post_attn_normed")),
                  layer.post_feedforward_layernorm.register_forward_hook(store("post_ffw_normed"))]
    modeling.eager_attention_forward = recording_attention
    try:
        yield captured
    finally:
        modeling.eager_attention_forward = eager
        for h in hooks:
            h.remove()


def greedy(model: Any, tokens: np.ndarray, mask: np.ndarray, max_new_tokens: int, **inputs: Any
           ) -> dict[str, np.ndarray]:
    """transformers `generate`'s greedy `ids` [B, max_new_tokens] after left-padded prompts `tokens` [B, T], and at
    each step the `margins` [B, max_new_tokens] between its two largest logits (float32), with no early stop (both
    sides produce exactly max_new_tokens ids, end ids included); `inputs` go to `generate` as they are (e.g.
    PaliGemma's pixel_values and token_type_ids)."""
    import torch

    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(input_ids=long_tensor(tokens), attention_mask=long_tensor(mask),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, top_k=None, top_p=None,
                             temperature=None, output_logits=True, return_dict_in_generate=True, **inputs)
    logits = torch.stack(out.logits, dim=1).float()  # [B, N, V] the raw logits each step chose from
    top_two = torch.topk(logits, 2, dim=-1).values
    return {"ids": out.sequences[:, tokens.shape[1]:].numpy(), "margins": (top_two[..., 0] - top_two[..., 1]).numpy()}
