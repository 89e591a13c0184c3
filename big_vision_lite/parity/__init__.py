"""Golden-value parity against transformers (PyTorch, eager attention), layer by layer, for every model kind.

    golden.py      the reference side: transformers live, recorded to a golden file, or a golden replayed
    report.py      one report: per-stage errors (NaN-aware), tolerances, greedy agreement, table and JSON
    torch_side.py  the PyTorch side: transformers models from the same files, stage hooks, greedy generation
    decoder.py     decoders: a padded batch longer than any window; every layer, the logits, greedy ids
    siglip.py      SigLIP: both towers, the embeddings, logits_per_image and the loss
    paligemma.py   PaliGemma: the vision tower, the projector, every decoder layer, greedy ids with the image

`run_parity(MODEL)` loads our side through `checkpoints.load` and the reference from the same files, and lets the
model kind's module compare them.
"""

from pathlib import Path
from typing import Any

import jax

from big_vision_lite.checkpoints import detect_kind, load, run
from big_vision_lite.checkpoints.packaged import is_packaged_name, resolve_model_path
from big_vision_lite.parity import decoder, golden, paligemma, siglip, torch_side
from big_vision_lite.parity.report import TRUTH_DTYPE, ParityReport, default_tolerance
from big_vision_lite.utils.dtypes import dtype_name
from big_vision_lite.utils.timing import Stopwatch

COMPARE = {"decoder": decoder.compare, "siglip": siglip.compare, "paligemma": paligemma.compare}


def run_parity(model: str, dtype: Any = "float32", *, tolerance: float | None = None, seq_len: int | None = None,
               record: str | Path | None = None, against: str | Path | None = None, **options: Any) -> ParityReport:
    """Compares our `model` with transformers in `dtype` (a name or a jnp dtype): a packaged name or an HF folder,
    the sources transformers reads too.

    `tolerance` defaults by dtype and model size (`report.TOLERANCES`); `seq_len` is the decoder batch's length
    (default: longer than any sliding window) and is refused for other kinds; `options` go to the kind's `compare`
    (e.g. `greedy_tokens`); the first decoder layer out of tolerance is drilled down to its sub-stages. Decoders
    and PaliGemma run with scanned layers (the generation inside unrolls them), SigLIP with unrolled blocks: the
    layouts the published figures were measured with.

    A bfloat16 run also runs transformers in float32 (`report.TRUTH_DTYPE`) as the truth, and judges every
    stage by how far each side is from it (`report.TruthError`).

    `record` also writes what transformers computed to a golden file; `against` replays one instead of running
    transformers (no torch needed), refusing a golden of other weights, dtype, options or batch (`golden.py`).
    """
    if record is not None and against is not None:
        raise ValueError("--record and --against exclude each other: record a golden with transformers, or check "
                         "against one without it")
    dtype = dtype_name(dtype)
    kind = detect_kind(model)
    path = Path(model).expanduser()
    if not is_packaged_name(model) and (path.is_file() or run.is_run(path)):
        raise ValueError(f"{model}: parity compares with transformers, which reads HF folders and packaged models, "
                         f"not {'a big_vision .npz' if path.is_file() else 'a training workdir'}")
    if seq_len is not None:
        if kind != "decoder":
            raise ValueError(f"--seq-len sets the decoder batch's length; {model} is a {kind} model, whose batch "
                             f"follows its config")
        options["seq_len"] = seq_len
    watch = Stopwatch()
    with watch("identify"):
        recorded_for = golden.identity(kind, resolve_model_path(model), dtype, options)
    if against is not None:  # checked before anything is loaded: a wrong golden fails at once
        reference: golden.ReferenceSide = golden.GoldenReference(against, recorded_for)
    with watch("load_ours"):
        loaded = load(model, dtype, scan_layers=kind != "siglip", return_hidden=True)
    tolerance = tolerance if tolerance is not None else default_tolerance(loaded.params, dtype)
    truth_dtype = TRUTH_DTYPE if dtype == "bfloat16" else None
    if against is None:
        with watch("load_reference"):
            if truth_dtype is None:
                model_ref, truth_model = torch_side.load_reference(loaded.kind, model, dtype), None
            else:
                truth_model = torch_side.load_reference(loaded.kind, model, truth_dtype)
                # A packaged decoder's GGUF is read once (the slow part), the bfloat16 side rebuilt from it.
                model_ref = (torch_side.reference_in_dtype(truth_model, dtype) if is_packaged_name(model)
                             else torch_side.load_reference(loaded.kind, model, dtype))
        side = golden.RecordingReference if record else golden.LiveReference
        reference = side(model_ref, truth_model)
    # Full-precision float32 matmuls: on GPUs and TPUs JAX's default may round them (TF32, bfloat16 passes), which
    # would be our error, not the model's. No effect on the CPU.
    with jax.default_matmul_precision("highest"):
        fields = COMPARE[loaded.kind](loaded, reference, watch, tolerance, **options)
    if isinstance(reference, golden.RecordingReference):
        reference.write(record, recorded_for)
    if isinstance(reference, golden.GoldenReference):
        fields["notes"] = [*fields.get("notes", []), reference.describe()]
    name = str(model) if is_packaged_name(model) else path.name
    if not fields.get("truth"):
        truth_dtype = None  # a golden recorded without one
    return ParityReport(model=name, dtype=dtype, seconds=watch.seconds, tolerance=tolerance, truth_dtype=truth_dtype,
                        **fields)
