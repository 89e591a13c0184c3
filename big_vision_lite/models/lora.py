"""An einsum layer with an optional low-rank (LoRA) adapter.

`Einsum(shape, equation)` holds one weight `w` of `shape` and computes `einsum(equation, x, w)`. With a
`LoRAConfig` it adds `scale * einsum(B, einsum(A, x))`, where A replaces the weight's last (output) axis by the
rank L and B maps L back to it, keeping the weight's other output axes (the 3 of q|k|v, the heads K) so every
head has its own adapter. B starts at zero, so a fresh adapter leaves the layer's output unchanged.

Example equations: q "BTD,NDH->BTNH" gives A "BTD,NDL->BTNL" and B "BTNL,NLH->BTNH"; the output projection
"BTNH,NHD->BTD" gives A "BTNH,NHL->BTL" and B "BTL,LD->BTD". `merge_lora` folds trained adapters into the
weights (for export to formats without adapters).
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Adapter settings: rank L, alpha, and rsLoRA (scale alpha/sqrt(L) instead of alpha/L)."""

    rank: int
    alpha: float = 1.0
    rslora: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def lora_equations(equation: str) -> tuple[str, str]:
    """Splits `equation` ("x,w->out") into the A and B equations of its adapter (see the module docstring)."""
    lhs, out = equation.replace(" ", "").split("->")
    x_axes, w_axes = lhs.split(",")
    last = w_axes[-1]
    # The adapter must produce the weight's last axis and must not see the letter we use for the rank.
    if last not in out or "L" in equation:
        raise ValueError(f"cannot build a LoRA adapter for einsum {equation!r}")
    a_eq = f"{x_axes},{w_axes[:-1]}L->{out.replace(last, 'L')}"
    kept = "".join(a for a in w_axes[:-1] if a in out)
    b_eq = f"{out.replace(last, 'L')},{kept}L{last}->{out}"
    return a_eq, b_eq


@jax.custom_vjp
def _stacked_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [.., D] times each matrix of the stack w [C, D, F]: [C, .., F] (the gate|up pair of the gated MLP).

    The forward pass broadcasts x over C, so C is a batch axis of one dot and XLA reads each [D, F] matrix in place
    (as "..D,CDF->C..F" it transposed the weight or the result on every call). The backward pass is written out
    as C plain matmuls per operand: autodiff's transpose of the broadcast made the gradient of x one batched dot
    fused with a sum over C, which XLA:CPU ran at a third to a half of its matmul rate (the largest single cost
    of the PaliGemma bench's "large" train step).
    """
    return _stacked_matmul_fwd(x, w)[0]


def _stacked_matmul_fwd(x, w):
    xs = jnp.broadcast_to(x, (w.shape[0], *x.shape))  # [C, .., D]
    return jnp.einsum("c...d,cdf->c...f", xs, w), (x, w)


def _stacked_matmul_bwd(residuals, grad):
    x, w = residuals  # grad [C, .., F]
    grad_x = sum(grad[c] @ w[c].T for c in range(w.shape[0]))  # [.., D]
    flat_x = x.reshape(-1, x.shape[-1])  # [M, D]
    grad_w = jnp.stack([flat_x.T @ grad[c].reshape(-1, w.shape[-1]) for c in range(w.shape[0])])  # [C, D, F]
    return grad_x.astype(x.dtype), grad_w.astype(w.dtype)


_stacked_matmul.defvjp(_stacked_matmul_fwd, _stacked_matmul_bwd)


def _merged_einsum(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`einsum(equation, x, w)`, written so that XLA:CPU reads the weight in place:

    - a stack of matrices w [C, D, F] whose axis C leads the output and x lacks ("BTD,cDF->cBTF", the gated MLP):
      `_stacked_matmul`;
    - x's trailing axes and w's leading axes are the contracted ones, in the same order (the output projection
      "BTNH,NHD->BTD"): both are reshaped so one plain [.., N*H] @ [N*H, D] does it; XLA otherwise transposes the
      weight on every call.
    """
    lhs, out = equation.replace(" ", "").split("->")
    x_axes, w_axes = lhs.split(",")
    if len(w_axes) == 3 and w_axes[0] not in x_axes and out == w_axes[0] + x_axes[:-1] + w_axes[2] \
            and x_axes[-1] == w_axes[1]:
        return _stacked_matmul(x, w)
    contracted = "".join(a for a in x_axes if a in w_axes and a not in out)
    n = len(contracted)
    if n < 2 or x_axes[-n:] != contracted or w_axes[:n] != contracted or out != x_axes[:-n] + w_axes[n:]:
        return jnp.einsum(equation, x, w)
    k = math.prod(w.shape[:n])
    return x.reshape(*x.shape[:-n], k) @ w.reshape(k, *w.shape[n:])


def lora_einsum(
    module: nn.Module,
    name: str,
    shape: Sequence[int],
    equation: str,
    x: jax.Array,
    *,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    w_init: nn.initializers.Initializer,
    lora: LoRAConfig | None,
) -> jax.Array:
    """Creates `name` (and `name`+"lora_a"/"lora_b" with a LoRA config) in `module` and applies the einsum.

    Shared by `Einsum` (params `w`, `lora_a`, `lora_b`) and the feed-forward layer, whose weights are direct
    params (`gating_einsum`, `linear`) as in big_vision and openpi checkpoints.
    """
    w = module.param(name, w_init, tuple(shape), param_dtype)
    x = x.astype(dtype)
    y = _merged_einsum(equation, x, w.astype(dtype))
    if lora is None:
        return y
    a_eq, b_eq = lora_equations(equation)
    lhs, out_axes = equation.replace(" ", "").split("->")
    w_axes = lhs.split(",")[1]
    kept = [n for a, n in zip(w_axes[:-1], shape[:-1], strict=True) if a in out_axes]
    prefix = "" if name == "w" else f"{name}_"
    a = module.param(f"{prefix}lora_a", nn.initializers.normal(stddev=0.01), (*shape[:-1], lora.rank), param_dtype)
    b = module.param(f"{prefix}lora_b", nn.initializers.zeros, (*kept, lora.rank, shape[-1]), param_dtype)
    delta = jnp.einsum(b_eq, jnp.einsum(a_eq, x, a.astype(dtype)), b.astype(dtype))
    return y + jnp.asarray(lora.scale, dtype) * delta


class Einsum(nn.Module):
    """`einsum(equation, x, w)` with `w` of `shape`, computed in `dtype`; LoRA-adapted when `lora` is set."""

    shape: Sequence[int]
    equation: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoRAConfig | None = None
    w_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return lora_einsum(
            self, "w", self.shape, self.equation, x,
            dtype=self.dtype, param_dtype=self.param_dtype, w_init=self.w_init, lora=self.lora,
        )


def merge_lora(params: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """`params` with every adapter folded into its weight, W + scale * A @ B computed in float32 and cast back to
    W's dtype, and the `lora_a`/`lora_b` entries removed: the parameters of the same model without LoRA.

    Axis letters: C the weight's contracted (input) axes, P its kept leading axes (the 3 of q|k|v, heads N or K,
    the 2 of gate|up), O its last (output) axis, L the rank. A is [P.., C.., L], B [P.., L, O]. Every einsum of
    this package keeps a *leading* run of the weight's axes (`lora_equations`: q "NDH" keeps N, kv "2KDH" keeps
    2 and K, the output projection "NHD" keeps none), so B's leading axes are W's first ones; the shape checks
    below hold that to account.
    """
    merged: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            merged[key] = merge_lora(value, scale)
        elif not key.endswith(("lora_a", "lora_b")):
            merged[key] = value
    for key in params:
        if not key.endswith("lora_a"):
            continue
        prefix = key[: -len("lora_a")]
        weight_name = prefix[:-1] if prefix else "w"  # `Einsum` holds `w`; the MLP `gating_einsum_lora_a`...
        w, a, b = (np.asarray(params[name]) for name in (weight_name, key, f"{prefix}lora_b"))
        kept = b.ndim - 2
        assert a.shape[:-1] == w.shape[:-1] and b.shape[-1] == w.shape[-1] and a.shape[-1] == b.shape[-2], (
            f"adapter {key} {a.shape} / {prefix}lora_b {b.shape} does not fit {weight_name} {w.shape}")
        assert b.shape[:-2] == w.shape[:kept], f"{prefix}lora_b {b.shape}: its leading axes must be {weight_name}'s"
        lead = "abcdefgh"[: w.ndim - 1]
        delta = np.einsum(f"{lead}z,{lead[:kept]}zy->{lead}y", a.astype(np.float32), b.astype(np.float32))
        merged[weight_name] = (w.astype(np.float32) + np.float32(scale) * delta).astype(w.dtype)
    return merged
