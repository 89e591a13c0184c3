"""The reference side of a parity run: transformers live, transformers recorded to a golden file, or a golden file
replayed with no PyTorch at all.

A kind's `compare` asks its reference side for each result by name with the inputs it was computed from:
`side.run("forward", {"tokens": ..., "mask": ...}, compute)`. `LiveReference` calls `compute` (transformers);
`RecordingReference` also keeps inputs and outputs; `GoldenReference` never calls it: it checks that the inputs
equal the recorded ones and returns the recorded outputs. A bfloat16 run also asks for the truth
(`run_truth`: the same computation by transformers in float32), recorded as `<name>_truth`. So
`bvl parity --against FILE` runs on a machine without torch (a TPU VM) with the same stages, tolerances and
report as a live run.

A golden file is one safetensors file: tensors `<name>/inputs/<key>` and `<name>/outputs/<key>`, and in its metadata
(`bvl_golden`, JSON) the identity of what was recorded: the model kind, the dtype, the comparison's options, the
sha256 of every weight and config file, plus (for people, not checked) the transformers and torch versions. A
golden recorded for other weights, another dtype, other options or another batch is refused naming what differs.
"""

import datetime
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from big_vision_lite.checkpoints.files import CheckpointError
from big_vision_lite.utils.atomic import atomic_file

METADATA_KEY = "bvl_golden"
FORMAT = 2  # 2: greedy results hold the top-two logit margins beside the ids
IDENTITY_KEYS = ("format", "kind", "dtype", "options", "files")  # what must match; the rest is information
HASHED_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json")

Outputs = dict[str, np.ndarray]


class GoldenError(CheckpointError):
    """A golden file that cannot be used: unreadable, truncated, or recorded for something else."""


class ReferenceSide(Protocol):
    model: Any  # the transformers model; None when replaying a golden file

    def run(self, name: str, inputs: Mapping[str, np.ndarray], compute: Callable[[], Outputs]) -> Outputs:
        """The reference's outputs for `inputs` (computed, or recorded under `name`)."""

    def run_truth(self, name: str, inputs: Mapping[str, np.ndarray], compute: Callable[[Any], Outputs]
                  ) -> Outputs | None:
        """The same computation in float32, `compute(truth_model)` (or recorded under `name`_truth);
        None when this side has no truth (float32 runs)."""


class LiveReference:
    def __init__(self, model: Any, truth_model: Any = None):
        self.model = model
        self.truth_model = truth_model

    def run(self, name: str, inputs: Mapping[str, np.ndarray], compute: Callable[[], Outputs]) -> Outputs:
        del name, inputs
        return compute()

    def run_truth(self, name: str, inputs: Mapping[str, np.ndarray], compute: Callable[[Any], Outputs]
                  ) -> Outputs | None:
        if self.truth_model is None:
            return None
        return self.run(f"{name}_truth", inputs, lambda: compute(self.truth_model))


class RecordingReference(LiveReference):
    """Live, keeping every call's inputs and outputs for `write`."""

    def __init__(self, model: Any, truth_model: Any = None):
        super().__init__(model, truth_model)
        self.calls: dict[str, tuple[Outputs, Outputs]] = {}

    def run(self, name: str, inputs: Mapping[str, np.ndarray], compute: Callable[[], Outputs]) -> Outputs:
        outputs = compute()
        assert name not in self.calls, f"reference call {name!r} made twice: a golden holds one result per name"
        self.calls[name] = ({k: np.asarray(v) for k, v in inputs.items()},
                            {k: np.asarray(v) for k, v in outputs.items()})
        return outputs

    def write(self, path: str | Path, identity: Mapping[str, Any]) -> Path:
        """Writes every recorded call and `identity` (plus the library versions) to `path`, atomically."""
        import torch
        import transformers

        tensors = {}
        for name, (inputs, outputs) in self.calls.items():
            tensors |= {f"{name}/inputs/{k}": np.ascontiguousarray(v) for k, v in inputs.items()}
            tensors |= {f"{name}/outputs/{k}": np.ascontiguousarray(v) for k, v in outputs.items()}
        info = dict(identity, transformers=transformers.__version__, torch=torch.__version__,
                    recorded=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
        return Path(path)


class GoldenReference:
    """Replays a golden file: the recorded outputs of calls whose inputs equal the recorded ones."""

    model = None

    def __init__(self, path: str | Path, identity: Mapping[str, Any]):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"--against {self.path}: no such golden file")
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                metadata = f.metadata() or {}
                self.tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError) as e:
            raise GoldenError(f"--against {self.path}: not a readable golden file ({e})") from None
        if METADATA_KEY not in metadata:
            raise GoldenError(f"--against {self.path}: a safetensors file without {METADATA_KEY!r} metadata, not a "
                              "golden written by `bvl parity --record`")
        self.info = json.loads(metadata[METADATA_KEY])
        differ = [key for key in IDENTITY_KEYS if self.info.get(key) != identity.get(key)]
        if differ:
            details = "; ".join(_difference(key, self.info.get(key), identity.get(key)) for key in differ)
            raise GoldenError(f"--against {self.path} was recorded for something else: {details}")

    def describe(self) -> str:
        return (f"reference: golden {self.path.name} (transformers {self.info.get('transformers')}, torch "
                f"{self.info.get('torch')}, recorded {self.info.get('recorded')})")

    def run(self, name: str, inputs: Mapping[str, np.ndarray], compute: Callable[[], Outputs]) -> Outputs:
        del compute  # never: this side has no PyTorch
        prefix = f"{name}/inputs/"
        recorded = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        if sorted(recorded) != sorted(inputs):
            raise GoldenError(f"--against {self.path}: {name!r} was recorded with inputs {sorted(recorded)}, this "
                              f"run has {sorted(inputs)}")
        for key, value in inputs.items():
            value, then = np.asarray(value), recorded[key]
            if value.shape != then.shape or not np.array_equal(value, then):
                raise GoldenError(f"--against {self.path}: {name} input {key!r} differs from the recorded batch "
                                  f"(recorded {then.dtype}{list(then.shape)}, now {value.dtype}{list(value.shape)})")
        prefix = f"{name}/outputs/"
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def run_truth(self, name: str, inputs: Mapping[str, np.ndarray], compute: Callable[[Any], Outputs]
                  ) -> Outputs | None:
        del compute
        recorded = any(k.startswith(f"{name}_truth/") for k in self.tensors)
        return self.run(f"{name}_truth", inputs, lambda: {}) if recorded else None


def _difference(key: str, recorded: Any, now: Any) -> str:
    if key == "files" and isinstance(recorded, dict) and isinstance(now, dict):
        changed = sorted(n for n in set(recorded) | set(now) if recorded.get(n) != now.get(n))
        return f"other weights ({', '.join(changed[:3])}: another sha256, or only on one side)"
    return f"{key} {recorded!r} recorded, {now!r} now"


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every weight and config file of an HF folder, by file name."""
    folder = Path(folder)
    hashes = {}
    for pattern in HASHED_FILES:
        for path in sorted(folder.glob(pattern)):
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            hashes[path.name] = digest.hexdigest()
    return hashes


def identity(kind: str, folder: str | Path, dtype: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """What a golden must have been recorded for to be checked against this run."""
    return {"format": FORMAT, "kind": kind, "dtype": dtype, "options": dict(sorted(options.items())),
            "files": file_hashes(folder)}
