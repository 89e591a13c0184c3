"""`load(name_or_path)`: whatever the source, one `Loaded` (kind, module, params, config, tokenizer).

Sources, and where "what kind of model is this" is decided (`detect_kind`, the one place):

- a packaged model name (`packaged.PACKAGED_MODELS`): its converted HF folder, a decoder;
- an HF folder: config.json's `model_type` (a decoder family, `siglip` or `paligemma`);
- a training workdir of ours (model.json: a SigLIP or PaliGemma run): its newest checkpoint;
- a big_vision `.npz` file (PaliGemma params): it holds no config, so `config=` must give one.

Params come back on the device in `param_dtype` (default: `dtype`), laid out for the module's `scan_layers`; the
module is built with the same settings every model takes (see utils.dtypes and models/). The tokenizer is the
source's own when it has one (tokenizer files in the folder, a run's `tokenizer/`), else None.
"""

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.checkpoints import run
from big_vision_lite.checkpoints.files import CheckpointError, read_hf_config
from big_vision_lite.checkpoints.hf_decoder import SUPPORTED_MODEL_TYPES, read_decoder_hf
from big_vision_lite.checkpoints.hf_paligemma import read_paligemma_hf
from big_vision_lite.checkpoints.hf_siglip import read_siglip_hf
from big_vision_lite.checkpoints.npz import load_npz_params
from big_vision_lite.checkpoints.packaged import (
    PACKAGED_MODELS,
    UnknownModelError,
    is_packaged_name,
    resolve_model_path,
)
from big_vision_lite.checkpoints.tokenizer import Tokenizer, has_tokenizer_files, load_tokenizer
from big_vision_lite.models.gemma import Decoder, DecoderConfig, relayout_layers
from big_vision_lite.models.paligemma import (
    PaliGemma,
    PaliGemmaConfig,
    paligemma_config_from_dict,
    relayout_paligemma,
)
from big_vision_lite.models.two_towers import TwoTowers, TwoTowersConfig, relayout_two_towers, two_towers_config
from big_vision_lite.utils.dtypes import as_dtype

KINDS = ("decoder", "siglip", "paligemma")
ModelConfig = DecoderConfig | TwoTowersConfig | PaliGemmaConfig


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model ready to run: `module.apply({"params": params}, ...)`."""

    kind: str  # one of KINDS
    module: nn.Module  # Decoder, TwoTowers or PaliGemma
    params: Any
    config: ModelConfig
    tokenizer: Tokenizer | None
    source: Path  # what was read: an HF folder (a packaged name's conversion), a workdir or an .npz file


def detect_kind(name_or_path: str | Path) -> str:
    """The kind (one of KINDS) of what `name_or_path` names; a ValueError naming it when it is none of them."""
    path = Path(name_or_path).expanduser()
    if is_packaged_name(name_or_path):
        return "decoder"
    if not path.exists():
        raise UnknownModelError(f"{name_or_path!r} is not an existing path (no such file or folder) nor a packaged "
                                f"model name; packaged models: {', '.join(sorted(PACKAGED_MODELS))}")
    if path.is_file():
        if path.suffix == ".npz":
            return "paligemma"
        raise CheckpointError(f"{path}: not a model: expected an HF folder, a training workdir, a packaged model "
                              f"name or a big_vision .npz file")
    if run.is_run(path):
        return run.read_run_info(path).kind
    if run.is_unrecorded_run(path):
        raise CheckpointError(f"{path}: a training workdir written before runs recorded their model (no "
                              f"{run.MODEL_FILE}): run its `bvl train CONFIG --workdir {path}` once more (it "
                              f"resumes, or re-evaluates a finished run, and writes {run.MODEL_FILE}), then load it")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a model: it holds neither config.json (an HF folder) nor model.json (a "
                              f"training workdir of ours)")
    model_type = read_hf_config(path).get("model_type")
    if model_type in ("siglip", "paligemma"):
        return model_type
    if model_type == "siglip2":  # SigLIP 2 (NaFlex): the SigLIP module with a NaFlex image tower
        return "siglip"
    if model_type == "gemma3":  # Gemma 3 with vision: PaliGemma's module with Gemma 3's projector
        return "paligemma"
    if model_type in SUPPORTED_MODEL_TYPES:
        return "decoder"
    raise CheckpointError(f"{path / 'config.json'}: model_type {model_type!r} is not supported; supported: "
                          f"{', '.join((*SUPPORTED_MODEL_TYPES, 'siglip', 'siglip2', 'paligemma', 'gemma3'))}")


def load(
    name_or_path: str | Path,
    dtype: Any = None,
    *,
    param_dtype: Any = None,
    scan_layers: bool = False,
    config: PaliGemmaConfig | None = None,
    **module_options: Any,
) -> Loaded:
    """Reads `name_or_path` (see the module docstring) into a module of its kind and its params.

    `dtype` is the compute dtype (default: a run's own, float32 otherwise), `param_dtype` the params' (default: a
    run's own, else `dtype`); `module_options` go to the module (e.g. `return_hidden=True`, `remat_policy=...`).
    `config` is the PaliGemmaConfig of an `.npz` file and is refused for every other source.
    """
    kind = detect_kind(name_or_path)
    path = Path(name_or_path).expanduser()
    run_info = run.read_run_info(path) if path.is_dir() and run.is_run(path) else None
    if config is not None and path.suffix != ".npz":
        raise ValueError(f"config= is for big_vision .npz files, which hold none; {name_or_path} has its own")
    dtype = as_dtype(dtype if dtype is not None else run_info.dtype if run_info else "float32")
    if param_dtype is None:
        param_dtype = run_info.param_dtype if run_info else dtype
    param_dtype = as_dtype(param_dtype)
    settings = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, **module_options)

    tokenizer = None
    if run_info is not None:
        _, params = run.load_params(path)
        if kind == "siglip":
            cfg: ModelConfig = two_towers_config(run_info.model)
        else:
            cfg = paligemma_config_from_dict(run_info.model)
        tokenizer = load_tokenizer(path / run.TOKENIZER_DIR)
        source = path
    elif path.suffix == ".npz" and path.is_file():
        if config is None:
            raise ValueError(f"{path}: a big_vision .npz holds no config; pass config=PaliGemmaConfig(...)")
        cfg, params, source = config, load_npz_params(path, config, scan_layers), path
    else:
        source = resolve_model_path(str(name_or_path))
        read = {"decoder": read_decoder_hf, "siglip": read_siglip_hf, "paligemma": read_paligemma_hf}[kind]
        cfg, params, _ = read(source)
        if is_packaged_name(name_or_path):
            tokenizer = load_tokenizer(str(name_or_path))
        elif has_tokenizer_files(source):
            tokenizer = load_tokenizer(source)

    if kind == "decoder":
        module: nn.Module = Decoder((cfg,), **settings)
        params = relayout_layers(params, cfg.depth, scan_layers)
    elif kind == "siglip":
        module = TwoTowers(cfg, **settings)
        params = relayout_two_towers(params, cfg, scan_layers)
    else:
        module = PaliGemma(cfg, **settings)
        params = relayout_paligemma(params, cfg, scan_layers)
    params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params)
    return Loaded(kind, module, params, cfg, tokenizer, Path(source))
