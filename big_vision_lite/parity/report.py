"""One parity report for every model kind: per-stage errors against the reference, greedy ids, tolerances, JSON.

A stage is compared on the rows (or tokens) that carry meaning (`valid`) as max |ours - ref| and the relative
error ||ours - ref|| / ||ref||. A stage in which either side holds a NaN or inf fails outright (its errors are
inf and `nonfinite` counts the bad values): no tolerance is met by a NaN, and a maximum over the stages must never
skip one. `ok` means every stage is finite and within tolerance and, for models that decode in float32, the
greedy ids equal the reference's.
"""

import dataclasses
import math
from typing import Any

import jax
import numpy as np

# Relative-error tolerances. float32: op-order differences only (tiny models reach ~1e-6; 18-30 real layers
# with 262k-wide logits accumulate more). bfloat16: 8 mantissa bits, ~4e-3 per rounding, compounded per layer.
TOLERANCES = {("float32", "tiny"): 1e-5, ("float32", "real"): 1e-4, ("bfloat16", "tiny"): 3e-2,
              ("bfloat16", "real"): 6e-2}
TINY_PARAMS = 10_000_000  # below this a checkpoint counts as a tiny test model


def default_tolerance(params: Any, dtype: str) -> float:
    """The tolerance of `dtype` for a model of these params' size (tiny test model or real checkpoint)."""
    n_params = sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(params))
    return TOLERANCES[(dtype, "tiny" if n_params < TINY_PARAMS else "real")]


@dataclasses.dataclass
class LayerError:
    name: str
    max_abs_err: float
    rel_err: float
    nonfinite: int = 0  # NaN or inf values on either side (0: both finite)


def compare_stage(name: str, ours: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> LayerError:
    """The errors of one stage over `valid` (a boolean index of the leading axes: rows, or [B, T] tokens)."""
    if ours.shape != ref.shape:
        raise AssertionError(f"{name}: our shape {ours.shape} differs from the reference's {ref.shape}")
    ours64, ref64 = ours.astype(np.float64)[valid], ref.astype(np.float64)[valid]
    nonfinite = int((~np.isfinite(ours64)).sum() + (~np.isfinite(ref64)).sum())
    if nonfinite:
        return LayerError(name, math.inf, math.inf, nonfinite)
    diff = ours64 - ref64
    return LayerError(name, float(np.abs(diff).max()), float(np.linalg.norm(diff) / np.linalg.norm(ref64)))


@dataclasses.dataclass
class ParityReport:
    """One parity run: the per-stage errors and, for models that decode, both sides' greedy ids.

    Encoders (SigLIP) have nothing to decode: `greedy_ours`/`greedy_ref` are None, and so are `greedy_match` and
    `greedy_agree` in the JSON, which keeps one contract for every model type. `notes` say what was not compared.
    """

    model: str
    model_type: str
    dtype: str
    tolerance: float
    layers: list[LayerError]
    greedy_ours: list[list[int]] | None
    greedy_ref: list[list[int]] | None
    seconds: dict[str, float]
    greedy_prompts: list[str] | None = None  # the texts behind the greedy ids (None: random ids)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def max_rel_err(self) -> float:
        """The largest relative error over the stages; inf when a stage is not finite (never skipped)."""
        return float(np.max([e.rel_err for e in self.layers]))

    @property
    def greedy_match(self) -> bool | None:
        return None if self.greedy_ours is None else self.greedy_ours == self.greedy_ref

    @property
    def greedy_agree(self) -> list[int] | None:
        """Per row, how many leading greedy ids agree (all of them when they match)."""
        if self.greedy_ours is None or self.greedy_ref is None:
            return None
        agree = []
        for ours, ref in zip(self.greedy_ours, self.greedy_ref, strict=True):
            same = [a == b for a, b in zip(ours, ref, strict=True)] + [False]
            agree.append(same.index(False))
        return agree

    @property
    def ok(self) -> bool:
        # bfloat16 implementations round in different places, so near-tied greedy choices may differ.
        worst = self.max_rel_err
        within = bool(np.isfinite(worst)) and worst <= self.tolerance
        return within and (self.greedy_match is not False or self.dtype != "float32")

    def to_json(self) -> dict[str, Any]:
        finite = lambda x: x if math.isfinite(x) else str(x)  # noqa: E731  JSON has no literal for inf
        return {
            "model": self.model,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "max_rel_err": finite(self.max_rel_err),
            "greedy_match": self.greedy_match,
            "greedy_agree": self.greedy_agree,
            "ok": self.ok,
            "layers": [{**dataclasses.asdict(e), "max_abs_err": finite(e.max_abs_err), "rel_err": finite(e.rel_err)}
                       for e in self.layers],
            "greedy_ours": self.greedy_ours,
            "greedy_ref": self.greedy_ref,
            "greedy_prompts": self.greedy_prompts,
            "seconds": self.seconds,
            "notes": self.notes,
        }

    def table(self) -> str:
        width = max(14, *(len(e.name) for e in self.layers))
        lines = [f"parity {self.model} ({self.model_type}, {self.dtype}) vs transformers eager",
                 f"{'stage':<{width}} {'max_abs_err':>12} {'rel_err':>12}"]
        for e in self.layers:
            bad = f"  {e.nonfinite} NaN/inf values" if e.nonfinite else ""
            lines.append(f"{e.name:<{width}} {e.max_abs_err:>12.3e} {e.rel_err:>12.3e}{bad}")
        lines += [f"note: {n}" for n in self.notes]
        summary = f"max_rel_err {self.max_rel_err:.3e} (tolerance {self.tolerance:.0e}); "
        if self.greedy_ours is not None:
            summary += (f"greedy {len(self.greedy_ours[0])} tokens match: {self.greedy_match} "
                        f"(leading ids that agree per row: {self.greedy_agree}); ")
        lines.append(summary + f"ok: {self.ok}")
        return "\n".join(lines)
