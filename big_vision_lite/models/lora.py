"""An einsum layer with an optional low-rank (LoRA) adapter.

`Einsum(shape, equation)` holds one weight `w` of `shape` and computes `einsum(equation, x, w)`. With a
`LoRAConfig` it adds `scale * einsum(B, einsum(A, x))`, where A replaces the weight's last (output) axis by the
rank L and B maps L back to it, keeping the weight's other output axes (the 3 of q|k|v, the heads K) so every
head has its own adapter. B starts at zero, so a fresh adapter leaves the layer's output unchanged.

Example equations: q "BTD,NDH->BTNH" gives A "BTD,NDL->BTNL" and B "BTNL,NLH->BTNH"; the output projection
"BTNH,NHD->BTD" gives A "BTNH,NHL->BTL" and B "BTL,LD->BTD".
"""

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def _merged_einsum(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`einsum(equation, x, w)`; when x's trailing axes and w's leading axes are the contracted ones, in the same
    order (the output projection "BTNH,NHD->BTD"), both are reshaped so one plain [.., N*H] @ [N*H, D] does it:
    XLA otherwise transposes the weight on every call."""
    lhs, out = equation.replace(" ", "").split("->")
    x_axes, w_axes = lhs.split(",")
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
