"""`DIR/metrics.jsonl`: one JSON object per logged step (training and evaluation), and a PNG of its curves.

Records are appended and flushed line by line, so a crash loses at most the line being written. On resume the
file is cut back to the restored step first: the steps after it are about to be trained again, and the file must
read as one run, not two interleaved ones. The records cut are never dropped: they are appended (and synced)
to `DIR/metrics.superseded.jsonl`, each with `"superseded_at": <restored step>`, before the main file is
rewritten, so a crash at any moment loses no line (at worst one appears in both files).
"""

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from big_vision_lite.utils.atomic import atomic_file, write_text_atomic

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"
CURVES_FILE = "curves.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics file (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends records to `workdir/metrics.jsonl`, keeping only those up to `resume_step` from earlier runs."""

    def __init__(self, workdir: str | Path, resume_step: int):
        self.path = Path(workdir) / METRICS_FILE
        records = read_metrics(self.path)
        kept = [r for r in records if r.get("step", 0) <= resume_step]
        superseded = [r for r in records if r.get("step", 0) > resume_step]
        if superseded:
            with (Path(workdir) / SUPERSEDED_FILE).open("a", encoding="utf-8") as side:
                side.writelines(json.dumps({**r, "superseded_at": resume_step}) + "\n" for r in superseded)
                side.flush()
                os.fsync(side.fileno())
        # Rewritten even when nothing was cut: a torn last line from a crash must not glue onto the next record.
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_jsonable(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    """Python floats and ints; NaN and inf become strings (JSON has no literal for them)."""
    out = {}
    for key, value in record.items():
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[key] = value
    return out


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def plot_curves(metrics_path: str | Path, png_path: str | Path, eval_keys: Iterable[str]) -> Path:
    """Training loss (left) and the evaluation metrics `eval_keys` (right) against the step."""
    records = read_metrics(metrics_path)
    fig = Figure(figsize=(10, 4))  # drawn without pyplot: a notebook's backend and inline plots stay as they are
    ax_loss, ax_eval = fig.subplots(1, 2)
    ax_loss.plot(*_series(records, "loss"), label="train loss")
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    for key in eval_keys:
        steps, values = _series(records, key)
        if steps:
            ax_eval.plot(steps, values, marker="o", label=key)
    ax_eval.set(xlabel="step", ylim=(0, 1.02), title="held-out evaluation")
    ax_eval.legend(loc="lower right")
    ax_loss.legend()
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return Path(png_path)
