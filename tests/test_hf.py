"""HF folders: bit-exact round trips, both config styles, and clear errors on bad checkpoints."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from big_vision_lite.checkpoints.files import CheckpointError
from big_vision_lite.checkpoints.hf_decoder import config_from_hf, config_to_hf, read_decoder_hf, save_decoder_hf

from conftest import TINY_FAMILIES


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_hf_round_trip_is_bit_exact(tiny_checkpoints, tmp_path, family):
    src = tiny_checkpoints[family]
    cfg, params, _ = read_decoder_hf(src)
    out = save_decoder_hf(tmp_path / "out", cfg, params, json.loads((src / "config.json").read_text()))
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert before[name].tobytes() == after[name].tobytes(), name
    # Written with a generated config (a model made in JAX), it loads back to the same config and weights.
    regenerated = save_decoder_hf(tmp_path / "regen", cfg, params)
    cfg2, params2, _ = read_decoder_hf(regenerated)
    assert cfg2 == cfg
    assert all(a.tobytes() == b.tobytes() for a, b in zip(_leaves(params), _leaves(params2), strict=True))


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_round_trip_keeps_bfloat16_bytes(tiny_checkpoints, tmp_path):
    import ml_dtypes

    src = tmp_path / "bf16"
    shutil.copytree(tiny_checkpoints["gemma3"], src)
    state = load_file(src / "model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}, src / "model.safetensors")
    cfg, params, _ = read_decoder_hf(src)
    assert all(leaf.dtype == ml_dtypes.bfloat16 for leaf in _leaves(params))
    out = save_decoder_hf(tmp_path / "out", cfg, params)
    after = load_file(out / "model.safetensors")
    before = load_file(src / "model.safetensors")
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)


GEMMA3_4X = {  # the transformers 4.x way of writing a Gemma 3 config
    "model_type": "gemma3_text", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 512, "sliding_window_pattern": 6,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
}


def test_gemma3_config_styles_agree():
    old = config_from_hf(GEMMA3_4X)
    assert old.layer_types == ("sliding",) * 5 + ("full",)
    assert (old.rope_theta, old.rope_scale, old.local_rope_theta, old.local_rope_scale) == (1e6, 8.0, 1e4, 1.0)
    assert old.query_scale == 256**-0.5 and old.qk_norm and old.post_norms and old.norm_plus_one
    new = config_from_hf(config_to_hf(old))
    assert new == old
    gemma2_4x = {**GEMMA3_4X, "model_type": "gemma2", "num_hidden_layers": 4, "rope_theta": 10_000.0}
    for key in ("rope_local_base_freq", "rope_scaling", "sliding_window_pattern"):
        gemma2_4x.pop(key)
    assert config_from_hf(gemma2_4x).layer_types == ("sliding", "full", "sliding", "full")


def test_llama_config_4x_and_5x():
    base = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    old = config_from_hf(base | {"rope_theta": 500_000.0})
    new = config_from_hf(base | {"rope_parameters": {"rope_type": "default", "rope_theta": 500_000.0}})
    assert old == new
    assert (old.head_dim, old.norm_plus_one, old.scale_embeddings, old.activation) == (8, False, False, "silu")
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        config_from_hf(base | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}})
    with pytest.raises(CheckpointError, match="attention_bias=true is not supported"):
        config_from_hf(base | {"attention_bias": True})


def _copy(tiny_checkpoints, tmp_path, family="llama"):
    dst = tmp_path / family
    shutil.copytree(tiny_checkpoints[family], dst)
    return dst


def test_missing_tensor_is_named(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints, tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing \(expected shape "
                                              r"\(64, 32\)\)"):
        read_decoder_hf(folder)


def test_shape_mismatch_names_file_tensor_and_shapes(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has "
                                              r"shape \(64, 32\), config.json implies \(80, 32\)"):
        read_decoder_hf(folder)


def test_unknown_model_type_lists_supported(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(CheckpointError, match=r"model_type 'mamba' is not supported; supported: \('gemma'"):
        read_decoder_hf(folder)


def test_truncated_file_is_named(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read safetensors file"):
        read_decoder_hf(folder)


def test_missing_files_and_unexpected_tensors(tiny_checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        read_decoder_hf(tmp_path)
    folder = _copy(tiny_checkpoints, tmp_path)
    state = load_file(folder / "model.safetensors")
    save_file(state | {"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.layers.0.self_attn.q_proj.bias'\]"):
        read_decoder_hf(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors file found"):
        read_decoder_hf(folder)


def test_save_leaves_no_partial_folder_on_failure(tiny_checkpoints, tmp_path):
    cfg, params, _ = read_decoder_hf(tiny_checkpoints["llama"])
    broken = dict(params)
    del broken["final_norm"]
    with pytest.raises(KeyError):
        save_decoder_hf(tmp_path / "out", cfg, broken)
    assert list(tmp_path.iterdir()) == []


def test_sharded_checkpoint_loads_like_a_single_file(tiny_checkpoints, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma2"], dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    cfg, params, _ = read_decoder_hf(tmp_path / "sharded")
    cfg_ref, params_ref, _ = read_decoder_hf(tiny_checkpoints["gemma2"])
    assert cfg == cfg_ref
    assert all(a.tobytes() == b.tobytes() for a, b in zip(_leaves(params), _leaves(params_ref), strict=True))
