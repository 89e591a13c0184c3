"""`bvl convert SRC DST`: any model `checkpoints.load` reads, written as an HF folder or a big_vision `.npz`, and
checked after writing.

SRC is an HF folder, a packaged model name, a training workdir of ours or a big_vision `.npz` (with `config`, the
PaliGemmaConfig an .npz does not hold); DST is written atomically (it appears complete or not at all) and is
refused when it exists unless `overwrite`.

- `to="hf"`: config.json + model.safetensors in the tensor dtype of the source, plus the source's tokenizer
  files, a folder transformers' `from_pretrained` reads as it is. An HF source keeps its own config.json,
  generation_config.json and PaliGemma tensor layout, so HF -> HF is byte-exact.
- `to="npz"`: big_vision's PaliGemma params layout (what big_vision and openpi load); PaliGemma models only.
- A model trained with LoRA adapters (a PaliGemma run with `model.llm.lora`) is exported merged by default
  (`lora="merge"`): W + scale * A @ B in float32, cast back (`models.lora.merge_lora`). With `lora="adapter"` (HF
  only) the base model is written without them and the adapters beside it as PEFT files in `DST/adapter/`
  (`checkpoints.peft`: transformers' `load_adapter` or PEFT's `PeftModel.from_pretrained` read them). An adapter
  the target cannot hold is an error naming it, never dropped.
- Verification (default): DST is loaded back through `checkpoints.load` and every tensor compared with what was
  written (bit for bit), and the config with the source's; a merged model is also run against the source with
  its adapters on a fixed token batch (the decoder's logits, float32, relative error <= `MERGED_TOLERANCE`);
  exported adapters are read back from the PEFT files into our layout and compared bit for bit.
"""

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.checkpoints import Loaded, detect_kind, load, run
from big_vision_lite.checkpoints.files import (
    SAFETENSORS_FLOAT_DTYPES,
    CheckpointError,
    read_hf_config,
    stored_tensor_dtypes,
)
from big_vision_lite.checkpoints.hf_decoder import save_decoder_hf
from big_vision_lite.checkpoints.hf_paligemma import detect_layout, paligemma_config_from_hf, save_paligemma_hf
from big_vision_lite.checkpoints.hf_siglip import save_siglip_hf
from big_vision_lite.checkpoints.npz import load_npz_params, save_npz_params
from big_vision_lite.checkpoints.packaged import is_packaged_name, resolve_model_path
from big_vision_lite.checkpoints.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_names,
    expected_adapters,
    peft_state,
    read_peft_adapters,
    write_peft_files,
)
from big_vision_lite.checkpoints.tokenizer import TOKENIZER_FILES
from big_vision_lite.decoding.engine import prefill
from big_vision_lite.models.gemma import Decoder, DecoderConfig
from big_vision_lite.models.lora import merge_lora
from big_vision_lite.models.paligemma import PaliGemma, PaliGemmaConfig, init_params, relayout_paligemma
from big_vision_lite.utils.inputs import check_output_dir, check_output_file
from big_vision_lite.utils.trees import path_name

FORMATS = ("hf", "npz")
LORA_EXPORTS = ("merge", "adapter")
ADAPTER_FOLDER = "adapter"  # DST/adapter/: the PEFT files of an adapter export, beside the base model
ORIGINAL_FILES = ("config.json", "generation_config.json")  # an HF source's files that an HF export keeps
MERGED_TOLERANCE = 1e-4  # float32 logits: the merge reorders one sum per weight, nothing more


def _check_destination(source: str, destination: Path, to: str, lora: str, overwrite: bool) -> None:
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: the formats are {', '.join(FORMATS)}")
    if lora not in LORA_EXPORTS:
        raise ValueError(f"--lora {lora!r}: the choices are {', '.join(LORA_EXPORTS)}")
    if lora == "adapter" and to != "hf":
        raise ValueError("--lora adapter writes PEFT adapter files beside an HF folder; big_vision's .npz has no "
                         "place for adapters (use --lora merge)")
    if destination.exists() and not overwrite:
        raise ValueError(f"destination {destination} exists: pass --overwrite to replace it (it is replaced only "
                         "once the new one is complete)")
    if not is_packaged_name(source) and destination.resolve() == Path(source).expanduser().resolve():
        raise ValueError(f"destination {destination} is the source itself: write to another path")
    if to == "hf":
        check_output_dir(destination, "destination")
    else:
        if destination.suffix != ".npz":
            raise ValueError(f"destination {destination}: an .npz export needs a path ending in .npz")
        check_output_file(destination, "destination")


def _source_folder(source: str) -> Path | None:
    """The HF folder a source reads from (a packaged model's converted folder), None for a run of ours or an .npz."""
    path = Path(source).expanduser()
    if (path.is_dir() and run.is_run(path)) or (path.suffix == ".npz" and path.is_file()):
        return None
    return Path(resolve_model_path(source))


def _stored_dtype(folder: Path) -> str:
    """The one float dtype an HF folder's tensors are stored in (refused when they mix several)."""
    floats = {SAFETENSORS_FLOAT_DTYPES[d] for d in stored_tensor_dtypes(folder).values()
              if d in SAFETENSORS_FLOAT_DTYPES}
    if len(floats) != 1:
        raise CheckpointError(f"{folder}: float tensors stored in {sorted(floats) or 'no float dtype'}; convert "
                              "needs one dtype to keep")
    return floats.pop()


def _lora_scale(loaded: Loaded) -> float | None:
    """The adapters' scale when the model carries LoRA (decoders and PaliGemma's decoder), else None."""
    llm = loaded.config.llm if isinstance(loaded.config, PaliGemmaConfig) else loaded.config
    lora = llm.lora if isinstance(llm, DecoderConfig) else None
    return None if lora is None else lora.scale


def _without_lora(config: Any) -> Any:
    if isinstance(config, PaliGemmaConfig):
        return dataclasses.replace(config, llm=dataclasses.replace(config.llm, lora=None))
    return dataclasses.replace(config, lora=None)


def _tokenizer_files(loaded: Loaded) -> list[Path]:
    if loaded.tokenizer is None:
        return []
    folder = loaded.tokenizer.source if loaded.tokenizer.source.is_dir() else loaded.source
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def _flat(params: Any) -> dict[str, np.ndarray]:
    return {path_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _compare_tensors(written: Any, read_back: Any, destination: Path) -> int:
    """Raises CheckpointError naming the first tensor that differs (or is missing) between the two trees."""
    ours, theirs = _flat(written), _flat(read_back)
    if missing := sorted(set(ours) ^ set(theirs)):
        raise CheckpointError(f"verify {destination}: tensors {missing[:5]} are in only one of what was written "
                              "and what reads back")
    for name, value in ours.items():
        other = theirs[name]
        if value.dtype != other.dtype or value.shape != other.shape or value.tobytes() != other.tobytes():
            raise CheckpointError(f"verify {destination}: tensor {name} reads back as {other.dtype}{other.shape}, "
                                  f"not the {value.dtype}{value.shape} written, or with other values")
    return len(ours)


def _decoder_logits(config: DecoderConfig, params: Any) -> np.ndarray:
    """float32 logits [2, 8, V] of a fixed token batch (the second row left-padded)."""
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % config.vocab_size
    mask = np.ones_like(tokens, bool)
    mask[1, :3] = False
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    logits, _, _ = prefill(Decoder((config,)), params, jnp.asarray(tokens), jnp.asarray(mask),
                           last_logits_only=False)
    return np.asarray(logits)[mask]


def convert(source: str, destination: str | Path, *, to: str = "hf", lora: str = "merge", overwrite: bool = False,
            verify: bool = True, config: PaliGemmaConfig | None = None) -> dict[str, Any]:
    """Writes `source` to `destination` as `to` (see the module docstring) and returns what was done."""
    destination = Path(destination).expanduser()
    _check_destination(source, destination, to, lora, overwrite)
    kind = detect_kind(source)
    if to == "npz" and kind != "paligemma":
        raise ValueError(f"{source} is a {kind} model; the .npz export writes big_vision's PaliGemma layout only "
                         "(use --to hf)")
    started = time.perf_counter()
    folder = _source_folder(source)
    param_dtype = _stored_dtype(folder) if folder is not None else None  # a run or an .npz keeps its own
    loaded = load(source, param_dtype=param_dtype, config=config)
    params = jax.tree.map(np.asarray, loaded.params)
    config = loaded.config
    scale = _lora_scale(loaded)
    if scale is None and lora == "adapter":
        raise ValueError(f"--lora adapter: {source} has no LoRA adapters to export")
    adapters: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None
    if scale is not None and lora == "merge":
        params = merge_lora(params, scale)
    elif scale is not None:
        if kind != "paligemma":
            raise ValueError(f"--lora adapter: adapters are exported for PaliGemma's decoder; {source} is a {kind}")
        adapters = peft_state(params["llm"], config.llm, "model.language_model.")
        params = _without_adapters(params)
    if scale is not None:
        config = _without_lora(config)
    leftover = adapter_names(params)
    assert not leftover, f"adapters left in the base model: {leftover[:3]}"  # nothing may be dropped silently
    if to == "npz" and config.projector != "linear":
        raise ValueError(f"{source} is a Gemma 3 with vision; big_vision's .npz layout is PaliGemma's (use --to hf)")
    if to == "hf" and isinstance(config, PaliGemmaConfig) and config.experts:
        single = PaliGemma(dataclasses.replace(config, experts=()))  # what HF's one decoder holds
        held = set(_flat(jax.eval_shape(lambda: init_params(single, jax.random.PRNGKey(0)))))
        homeless = sorted(set(_flat(relayout_paligemma(params, config, scan_layers=False))) - held)
        raise ValueError(f"{source}: HF PaliGemma has one decoder; the {len(homeless)} tensors of its "
                         f"{len(config.experts)} extra expert(s) have no place there ({', '.join(homeless[:4])}, "
                         "...): export with --to npz (openpi's layout holds them)")

    with tempfile.TemporaryDirectory(dir=destination.parent if destination.parent.is_dir() else None) as staging:
        if to == "hf":
            keep_original = folder is not None and scale is None  # an HF source's own config.json and layout
            hf_config = read_hf_config(folder) if keep_original else None
            extra: list[Any] = _tokenizer_files(loaded)
            if keep_original:  # copied as they are (over the config.json written from hf_config): byte-exact
                extra += [folder / name for name in ORIGINAL_FILES if (folder / name).is_file()]
            if adapters is not None:
                write_peft_files(Path(staging), *adapters)
                extra += [(f"{ADAPTER_FOLDER}/{name}", Path(staging) / name)
                          for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]
            if kind == "decoder":
                save_decoder_hf(destination, config, params, hf_config, extra)
            elif kind == "siglip":
                save_siglip_hf(destination, config, params, hf_config, extra)
            else:
                # The source's own tensor names (transformers' save has a flat vision tower, neither of LAYOUTS).
                layout = detect_layout(stored_tensor_dtypes(folder), str(folder)) if keep_original else "legacy"
                save_paligemma_hf(destination, config, params, layout, hf_config, extra)
        else:
            save_npz_params(destination, params)

    report: dict[str, Any] = {"source": source, "destination": str(destination), "kind": kind, "format": to,
                              "dtype": jax.tree.leaves(params)[0].dtype.name,
                              "lora_merged": scale is not None and adapters is None,
                              "lora_adapter": None if adapters is None else str(destination / ADAPTER_FOLDER),
                              "tensors": len(_flat(params)), "verified": None}
    if verify:
        if to == "hf":
            back = load(destination, param_dtype=report["dtype"])
            if back.config != config:
                raise CheckpointError(f"verify {destination}: its config reads back as {back.config}, not {config}")
            back_params = back.params
        else:
            back_params = load_npz_params(destination, config)
        _compare_tensors(params, back_params, destination)
        report["verified"] = "every tensor reads back bit for bit"
        if adapters is not None:
            rank = loaded.config.llm.lora.rank
            written = read_peft_adapters(destination / ADAPTER_FOLDER, config.llm, "model.language_model.", rank)
            _compare_tensors(expected_adapters(loaded.params["llm"], loaded.config.llm), written,
                             destination / ADAPTER_FOLDER)
            report["verified"] += "; every adapter reads back from the PEFT files bit for bit"
        elif scale is not None:
            error = _merged_error(loaded, params)
            if not error <= MERGED_TOLERANCE:
                raise CheckpointError(f"verify {destination}: the merged decoder's logits differ from the adapted "
                                      f"one's by {error:.2e} (relative), above {MERGED_TOLERANCE}")
            report["verified"] += f"; merged logits within {error:.1e} of the adapted model's"
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def npz_config(path: str | Path) -> PaliGemmaConfig:
    """The PaliGemmaConfig of a big_vision .npz source, read from an HF PaliGemma folder (or its config.json) that
    describes the same model (an .npz holds no config)."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    if not path.is_dir() and path.name != "config.json":
        raise ValueError(f"--config {path}: give an HF PaliGemma folder or its config.json")
    return paligemma_config_from_hf(read_hf_config(folder), str(folder / "config.json"))


def _without_adapters(params: Any) -> Any:
    """`params` without its `lora_a`/`lora_b` entries (the base model an adapter export writes)."""
    if not isinstance(params, dict):
        return params
    return {k: _without_adapters(v) for k, v in params.items() if not k.endswith(("lora_a", "lora_b"))}


def _merged_error(loaded: Loaded, merged_params: Any) -> float:
    """Relative max error of the merged decoder's logits against the source's decoder with its adapters."""
    if isinstance(loaded.config, PaliGemmaConfig):
        adapted_config, adapted, merged = loaded.config.llm, loaded.params["llm"], merged_params["llm"]
    else:
        adapted_config, adapted, merged = loaded.config, loaded.params, merged_params
    reference = _decoder_logits(adapted_config, adapted)
    ours = _decoder_logits(dataclasses.replace(adapted_config, lora=None), merged)
    return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-30))
