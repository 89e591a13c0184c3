"""One parity report for every model kind: per-stage errors against the reference, greedy ids, tolerances, JSON.

A stage is compared on the rows (or tokens) that carry meaning (`valid`) as max |ours - ref| and the relative
error ||ours - ref|| / ||ref||. A stage in which either side holds a NaN or inf fails outright (its errors are
inf and `nonfinite` counts the bad values): no tolerance is met by a NaN, and a maximum over the stages must never
skip one.

Greedy ids that differ are diagnosed (`Divergence`): the first step where a row's ids differ, both sides' margin
between their two largest logits there, and a verdict. Both sides saw the same ids up to that step, so each logit
differs by at most the logits' observed error e (the forward batch's max |ours - ref| of `logits`); two logits each
off by e can swap places when they were less than 2 e apart (`NEAR_TIE_FACTOR`). A smaller margin on either side is
a near-tie (rounding chose), a larger one a defect. `ok` means every stage is finite and within tolerance and every
greedy divergence is a near-tie.
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
# bfloat16 runs are judged against the truth: transformers in float32, whose error (<= 1e-4 even on real models) is
# ~100x below bfloat16's. (Not float64: transformers' additive masks turn left-padding rows into NaNs in float64 and
# the NaN keys then reach every row.)
TRUTH_DTYPE = "float32"
# Ours may be at most this many times further from the truth than transformers' bfloat16 run. Measured ratios:
# 0.85-1.0 on the tiny families, 0.92-1.05 on Gemma 3 270M, 0.45-1.98 on SmolLM2-135M (its layer 2: both sides keep
# the residual stream in bfloat16 and round a few large activations differently); 3 leaves margin above 1.98, and a
# defect as small as a query scale off by 10% (1/sqrt(20) for 1/sqrt(24)) already shows 3.7.
TRUTH_FACTOR = 3.0
TRUTH_FLOOR = 1e-5  # an error below float32's tolerance counts as none (a factor of ~0 would demand exactness)
NEAR_TIE_FACTOR = 2.0  # two logits each off by e swap only when less than 2 e apart (see the module docstring)


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


def within(error: LayerError, tolerance: float) -> bool:
    """The stage is finite and its relative error at most `tolerance`."""
    return math.isfinite(error.rel_err) and error.rel_err <= tolerance


@dataclasses.dataclass
class TruthError:
    """One stage of a bfloat16 run measured against the truth: our relative error and transformers'."""

    name: str
    ours_rel_err: float
    ref_rel_err: float

    @property
    def passes(self) -> bool:
        """Ours is no further from the truth than TRUTH_FACTOR x transformers' (errors below TRUTH_FLOOR: none)."""
        return math.isfinite(self.ours_rel_err) and self.ours_rel_err <= TRUTH_FACTOR * max(self.ref_rel_err,
                                                                                             TRUTH_FLOOR)


def truth_stage(name: str, ours: np.ndarray, ref: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> TruthError:
    """Both sides' relative errors against the truth of one stage, over `valid` (see `compare_stage`)."""
    return TruthError(name, compare_stage(name, ours, truth, valid).rel_err,
                      compare_stage(name, ref, truth, valid).rel_err)


def compare_stages(names: list[str], ours: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                   truth: dict[str, np.ndarray] | None, valid: np.ndarray
                   ) -> tuple[list[LayerError], list[TruthError]]:
    """`compare_stage` of each named stage, and `truth_stage` of each when there is a truth (else [])."""
    errors = [compare_stage(n, ours[n], ref[n], valid) for n in names]
    return errors, [] if truth is None else [truth_stage(n, ours[n], ref[n], truth[n], valid) for n in names]


@dataclasses.dataclass
class DrillDown:
    """The sub-stages of the first layer out of tolerance, and the first of them out of tolerance (None: each is
    within it, only their sum is not)."""

    layer: str
    stages: list[LayerError]
    first_broken: str | None


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
class Divergence:
    """The first step at which one row's greedy ids differ, and whether rounding explains it."""

    row: int
    step: int
    id_ours: int
    id_ref: int
    margin_ours: float  # our top-1 minus top-2 logit at that step
    margin_ref: float
    near_tie: bool  # a margin below NEAR_TIE_FACTOR x the logits' observed error on either side


def greedy_fields(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, Any]:
    """Both sides' greedy `ids` and `margins` [B, N] as `ParityReport` fields."""
    for side, out in (("ours", ours), ("ref", ref)):
        assert out["ids"].shape == out["margins"].shape, (side, out["ids"].shape, out["margins"].shape)
    return {"greedy_ours": ours["ids"].tolist(), "greedy_ref": ref["ids"].tolist(),
            "greedy_margins_ours": ours["margins"].tolist(), "greedy_margins_ref": ref["margins"].tolist()}


def greedy_divergences(ours: list[list[int]], ref: list[list[int]], margins_ours: list[list[float]],
                       margins_ref: list[list[float]], logit_error: float) -> list[Divergence]:
    """One `Divergence` per row whose ids differ, at its first differing step; near-tie below
    NEAR_TIE_FACTOR * `logit_error` (inf when the logits were not finite: nothing is then called a near-tie)."""
    near = NEAR_TIE_FACTOR * logit_error if math.isfinite(logit_error) else -math.inf
    found = []
    for row, (a, b) in enumerate(zip(ours, ref, strict=True)):
        step = next((s for s, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if step is None:
            continue
        m_ours, m_ref = float(margins_ours[row][step]), float(margins_ref[row][step])
        found.append(Divergence(row, step, a[step], b[step], m_ours, m_ref, min(m_ours, m_ref) < near))
    return found


def finite(x: float) -> float | str:
    """x, or its name when it is not finite: JSON has no literal for inf or NaN."""
    return x if math.isfinite(x) else str(x)


def stage_json(error: LayerError) -> dict[str, Any]:
    return {**dataclasses.asdict(error), "max_abs_err": finite(error.max_abs_err), "rel_err": finite(error.rel_err)}


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
    greedy_margins_ours: list[list[float]] | None = None  # [B, N] top-1 minus top-2 logit at each step
    greedy_margins_ref: list[list[float]] | None = None
    drill_down: DrillDown | None = None
    truth: list[TruthError] = dataclasses.field(default_factory=list)  # bfloat16 runs: every stage vs the truth
    truth_dtype: str | None = None
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
    def logit_error(self) -> float:
        """The forward batch's max |ours - ref| over the logits: how far apart the two sides' logits may be."""
        return next((e.max_abs_err for e in self.layers if e.name == "logits"), math.inf)

    @property
    def divergences(self) -> list[Divergence]:
        """Per row whose greedy ids differ, the first differing step; without margins nothing is a near-tie."""
        if self.greedy_ours is None or self.greedy_ref is None:
            return []
        unknown = [[math.inf] * len(row) for row in self.greedy_ours]
        return greedy_divergences(self.greedy_ours, self.greedy_ref, self.greedy_margins_ours or unknown,
                                  self.greedy_margins_ref or unknown, self.logit_error)

    @property
    def ok(self) -> bool:
        # With a truth, each stage is judged by how far each side is from it (TruthError.passes); without, by the
        # side-by-side tolerance. Implementations round in different places, so greedy choices between near-tied
        # logits may differ.
        worst = self.max_rel_err
        if not np.isfinite(worst):
            return False
        within = all(t.passes for t in self.truth) if self.truth else worst <= self.tolerance
        return within and all(d.near_tie for d in self.divergences)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "max_rel_err": finite(self.max_rel_err),
            "greedy_match": self.greedy_match,
            "greedy_agree": self.greedy_agree,
            "ok": self.ok,
            "layers": [stage_json(e) for e in self.layers],
            "truth_dtype": self.truth_dtype,
            "truth_factor": TRUTH_FACTOR if self.truth else None,
            "truth": [{"name": t.name, "ours_rel_err": finite(t.ours_rel_err), "ref_rel_err": finite(t.ref_rel_err),
                       "passes": t.passes} for t in self.truth],
            "drill_down": None if self.drill_down is None else {
                "layer": self.drill_down.layer, "first_broken": self.drill_down.first_broken,
                "stages": [stage_json(e) for e in self.drill_down.stages]},
            "greedy_ours": self.greedy_ours,
            "greedy_ref": self.greedy_ref,
            "greedy_prompts": self.greedy_prompts,
            "greedy_margins_ours": self.greedy_margins_ours,
            "greedy_margins_ref": self.greedy_margins_ref,
            "divergences": [dataclasses.asdict(d) for d in self.divergences],
            "near_tie_below": finite(NEAR_TIE_FACTOR * self.logit_error) if self.greedy_ours is not None else None,
            "seconds": self.seconds,
            "notes": self.notes,
        }

    def table(self) -> str:
        drilled = [] if self.drill_down is None else self.drill_down.stages
        width = max(14, *(len(e.name) for e in self.layers), *(len(e.name) + 2 for e in drilled))
        truth = {t.name: t for t in self.truth}
        head = f"{'stage':<{width}} {'max_abs_err':>12} {'rel_err':>12}"
        if truth:
            head += f" {'ours~truth':>12} {'ref~truth':>12} {'ratio':>7}"
        lines = [f"parity {self.model} ({self.model_type}, {self.dtype}) vs transformers eager", head]
        for e in self.layers:
            bad = f"  {e.nonfinite} NaN/inf values" if e.nonfinite else ""
            row = f"{e.name:<{width}} {e.max_abs_err:>12.3e} {e.rel_err:>12.3e}"
            if (t := truth.get(e.name)) is not None:
                ratio = t.ours_rel_err / max(t.ref_rel_err, TRUTH_FLOOR)
                row += f" {t.ours_rel_err:>12.3e} {t.ref_rel_err:>12.3e} {ratio:>7.2f}{'' if t.passes else ' !'}"
            lines.append(row + bad)
        if truth:
            lines.append(f"truth: transformers in {self.truth_dtype}; a stage passes when ours~truth <= "
                         f"{TRUTH_FACTOR:g} x max(ref~truth, {TRUTH_FLOOR:g})")
        if (drill := self.drill_down) is not None:
            lines.append(f"drill-down of {drill.layer}, the first layer out of tolerance:")
            lines += [f"  {e.name:<{width - 2}} {e.max_abs_err:>12.3e} {e.rel_err:>12.3e}" for e in drill.stages]
            lines.append(f"  first sub-stage out of tolerance: {drill.first_broken or 'none on its own'}")
        for d in self.divergences:
            verdict = "near-tie (rounding)" if d.near_tie else "DEFECT (margin too large for rounding)"
            lines.append(f"greedy row {d.row} diverges at step {d.step}: ours {d.id_ours} (margin {d.margin_ours:.3g}),"
                         f" ref {d.id_ref} (margin {d.margin_ref:.3g}); near-tie below "
                         f"{NEAR_TIE_FACTOR * self.logit_error:.3g}: {verdict}")
        lines += [f"note: {n}" for n in self.notes]
        summary = f"max_rel_err {self.max_rel_err:.3e} (tolerance {self.tolerance:.0e}"
        summary += ", not the verdict: the truth is); " if truth else "); "
        if self.greedy_ours is not None:
            summary += (f"greedy {len(self.greedy_ours[0])} tokens match: {self.greedy_match} "
                        f"(leading ids that agree per row: {self.greedy_agree}); ")
        lines.append(summary + f"ok: {self.ok}")
        return "\n".join(lines)
