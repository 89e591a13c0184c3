"""Shared fixtures: tiny random-init transformers checkpoints of every decoder family, built (never downloaded), and
the real packaged checkpoints converted once per session into a fresh cache."""

import json
import shutil
from pathlib import Path

import pytest

# Every family and path the decoder supports, as transformers config kwargs.
TINY_FAMILIES = {
    "gemma_mha": ("gemma", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8)),
    "gemma_mqa": ("gemma", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    "gemma2": ("gemma2", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        attn_logit_softcapping=3.0, final_logit_softcapping=2.0, sliding_window=8, num_hidden_layers=3,
    )),
    "gemma3": ("gemma3_text", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    )),
    "llama": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 500_000.0})),
    "qwen3": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
}


def build_tiny_hf(family: str, folder: Path, seed: int = 0) -> Path:
    """Saves a tiny random transformers model of `family` (a TINY_FAMILIES key) into `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = TINY_FAMILIES[family]
    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # The default init (std 0.02, norms at identity) hides bugs in norms and scales; larger weights expose them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.2)
    model.save_pretrained(folder)
    return folder


def spread_siglip_weights(model) -> None:
    """Weights of a tiny SigLIP (1 or 2) far from their init: LayerNorm scales near 1, everything else wide."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 if ("norm" in name or name.startswith("logit")) else 0.2)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {family: build_tiny_hf(family, root / family) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def packaged_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bvl_cache")


@pytest.fixture(scope="session")
def converted(packaged_cache):
    """name -> (gguf file, converted HF folder), converted once per session into a fresh cache."""
    from big_vision_lite.checkpoints.packaged import packaged_gguf_path, resolve_model_path

    results: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in results:
            # Scoped so the session cache does not leak into other test files' environment.
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("BVL_CACHE_DIR", str(packaged_cache))
                results[name] = (packaged_gguf_path(name), resolve_model_path(name))
        return results[name]

    return get


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny gemma3 checkpoint plus a character-level BPE tokenizer of its 96 ids (pad 0, bos 1, eos 2)."""
    import tokenizers

    folder = tmp_path_factory.mktemp("tiny_tok") / "gemma3"
    shutil.copytree(tiny_checkpoints["gemma3"], folder)
    rust = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    rust.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=96, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"])
    corpus = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "to be or not to be"]
    rust.train_from_iterator(corpus * 20, trainer)
    assert rust.get_vocab_size() <= 96
    rust.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}))
    return folder


# What tests/test_faults.py tried and found, printed in pytest's terminal summary (the README quotes the line).
FAULT_TALLY = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def fault_tally(request) -> dict[str, int]:
    return request.config.stash.setdefault(FAULT_TALLY, {"bad inputs tried": 0, "tracebacks": 0, "files lost": 0})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tally = config.stash.get(FAULT_TALLY, None)
    if tally:
        terminalreporter.write_line(", ".join(f"{key}: {value}" for key, value in tally.items()))
