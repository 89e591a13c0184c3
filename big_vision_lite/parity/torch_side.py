"""The PyTorch side of every parity check and benchmark: transformers models loaded from the same files as ours,
the hooks that record a decoder's stages, and greedy generation without early stop.

torch is imported inside the functions: the rest of the package (and our side of a parity run) runs without it.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from big_vision_lite.checkpoints.packaged import is_packaged_name, packaged_gguf_path
from big_vision_lite.utils.dtypes import dtype_name

# The transformers class of each model kind (`checkpoints.KINDS`).
REFERENCE_CLASSES = {"decoder": "AutoModelForCausalLM", "siglip": "SiglipModel",
                     "paligemma": "PaliGemmaForConditionalGeneration"}


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


def greedy(model: Any, tokens: np.ndarray, mask: np.ndarray, max_new_tokens: int, **inputs: Any) -> np.ndarray:
    """transformers `generate`'s greedy ids [B, max_new_tokens] after left-padded prompts `tokens` [B, T], with no
    early stop (both sides produce exactly max_new_tokens ids, end ids included); `inputs` go to `generate` as they
    are (e.g. PaliGemma's pixel_values and token_type_ids)."""
    import torch

    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(input_ids=long_tensor(tokens), attention_mask=long_tensor(mask),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, top_k=None, top_p=None,
                             temperature=None, **inputs)
    return out[:, tokens.shape[1]:].numpy()
