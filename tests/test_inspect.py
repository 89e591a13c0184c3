"""Attention capture during generation (greedy ids, probabilities against a teacher-forced forward), `bvl inspect`."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.checkpoints import load
from big_vision_lite.cli import main
from big_vision_lite.decoding import attention_stats as stats
from big_vision_lite.decoding.engine import generate
from big_vision_lite.decoding.inspect import capture_generation
from big_vision_lite.models.masks import positions_from_mask, prefill_mask
from big_vision_lite.parity.decoder import parity_batch

NEW = 6


@pytest.fixture(scope="module")
def captured(tiny_checkpoints):
    """The tiny Gemma 3 (sliding and full layers, GQA) on 2 rows, the second left-padded, with all layers kept."""
    loaded = load(tiny_checkpoints["gemma3"])
    module, params = loaded.module, loaded.params
    tokens, mask = parity_batch(loaded.config.vocab_size, 12)
    return module, params, tokens, mask, capture_generation(module, params, tokens, mask, NEW)


def test_probabilities_equal_a_teacher_forced_forward(captured):
    module, params, tokens, mask, capture = captured
    full_tokens = np.concatenate([tokens, capture.tokens], axis=1)  # [B, T + M]
    full_mask = jnp.asarray(np.concatenate([mask, np.ones_like(capture.tokens, bool)], axis=1))
    _, _, out = module.clone(return_probs=True).apply({"params": params}, jnp.asarray(full_tokens),
                                                      positions_from_mask(full_mask), prefill_mask(full_mask))
    probs = np.asarray(out["attn_probs"])  # [L, B, N, T + M, T + M]
    prompt_len = tokens.shape[1]
    # The captured ids are greedy: each is the argmax of the teacher-forced logits one position before it.
    logits, _, _ = module.apply({"params": params}, jnp.asarray(full_tokens), positions_from_mask(full_mask),
                                prefill_mask(full_mask))
    np.testing.assert_array_equal(capture.tokens, np.argmax(logits[:, prompt_len - 1:-1], -1))
    np.testing.assert_allclose(capture.step_probs, probs[:, :, :, prompt_len:].transpose(3, 0, 1, 2, 4), atol=2e-6)
    query_valid = mask[None, :, None, :, None]
    np.testing.assert_allclose(capture.prefill_probs, np.where(query_valid, probs[..., :prompt_len, :prompt_len], 0),
                               atol=2e-6)
    # The reduced statistics are those of the captured probabilities.
    np.testing.assert_array_equal(capture.step_member, stats.top_p_mask(capture.step_probs, 0.95))
    np.testing.assert_array_equal(capture.step_set_size, capture.step_member.sum(-1))
    positions = capture.key_positions[None, :, None, :]
    np.testing.assert_allclose(capture.step_sink_mass, np.where(positions < 1, capture.step_probs, 0).sum(-1),
                               atol=1e-6)
    assert capture.membership().shape == (3, 2, 4, prompt_len + NEW, prompt_len + NEW)
    assert not capture.prefill_member[:, 1, :, : prompt_len // 4].any()  # padding queries hold no keys


def test_chosen_layers_without_probabilities(captured):
    module, params, tokens, mask, capture = captured
    small = capture_generation(module, params, tokens, mask, NEW, layers=[2, 0], keep_probs=False)
    assert small.layers == (2, 0) and small.step_probs is None and small.prefill_probs is None
    np.testing.assert_array_equal(small.tokens, capture.tokens)
    np.testing.assert_array_equal(small.step_member, capture.step_member[:, [2, 0]])
    np.testing.assert_array_equal(small.prefill_member, capture.prefill_member[[2, 0]])
    np.testing.assert_allclose(small.k, capture.k[[2, 0]])


def test_capture_input_errors(captured):
    module, params, tokens, mask, _ = captured
    with pytest.raises(ValueError, match=r"layer 3 is out of range: the model has 3 layers, indices 0..2"):
        capture_generation(module, params, tokens, mask, 2, layers=[0, 3])
    with pytest.raises(ValueError, match="name a layer twice"):
        capture_generation(module, params, tokens, mask, 2, layers=[1, 1])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        capture_generation(module, params, tokens, mask, 0)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\], got 0"):
        capture_generation(module, params, tokens, mask, 2, p=0.0)
    with pytest.raises(ValueError, match="must be left-padded"):
        capture_generation(module, params, tokens, mask[:, ::-1], 2)


def test_cli_inspect_writes_summary_and_plots(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["inspect", str(tiny_with_tokenizer), "--prompt", "the quick brown fox jumps", "--max-new-tokens",
                 "10", "--look-back", "2", "--layers", "0", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote summary.json" in printed and "forgotten" in printed
    summary = json.loads((out / "summary.json").read_text())
    for name in ("prompt_attention.png", "top_p_membership.png", "top_p_set_size.png", "forgotten_revived.png"):
        assert (out / name).stat().st_size > 5_000, name
        assert name in summary["files"]
    assert summary["layers"] == [0, 2] and summary["new_tokens"] == 10 and summary["look_back"] == 2
    assert summary["prompt"] == "the quick brown fox jumps" and summary["num_heads"] == 4
    keys = summary["prompt_len"] + 10
    assert len(summary["key_texts"]) == keys == len(summary["key_steps_in_set"])
    assert summary["eligible_keys"] == keys - 3 * 2  # one row, no padding
    for layer in summary["per_layer"]:
        assert 1 <= layer["mean_set_size_decode"] <= keys and 1 <= layer["mean_set_size_prefill"] <= keys
        assert 0 <= layer["sink_share_decode"] <= 1 and 0 <= layer["sink_share_prefill"] <= 1
        assert len(layer["forgotten_per_head"]) == 4 and len(layer["kv_similarity"]["both_pairs"]) == 2
        assert sum(layer["forgotten_per_head"]) <= 4 * summary["eligible_keys"]
        assert layer["kv_similarity"]["num_pairs"] == keys * (keys - 1) // 2
    assert summary["per_layer"][1]["sink_share_prefill"] > 0  # layer 2 is global: every query sees position 0

    # The ids are `generate`'s greedy ids of the tokenized prompt.
    loaded = load(tiny_with_tokenizer)
    ids = np.array([loaded.tokenizer.encode("the quick brown fox jumps")])
    expected = generate(loaded.module, loaded.params, ids, np.ones_like(ids, bool), 10).tokens
    assert summary["generated_tokens"] == expected[0].tolist()


def test_cli_inspect_input_errors(tiny_with_tokenizer, tmp_path, capsys):
    model, out = str(tiny_with_tokenizer), str(tmp_path / "out")
    assert main(["inspect", model, "--prompt", "to be", "--max-new-tokens", "0", "--out", out]) == 2
    assert "argument --max-new-tokens: expected an integer in [1, inf), got 0" in capsys.readouterr().err
    assert main(["inspect", model, "--prompt", "to be", "--layers", "0", "5", "--out", out]) == 2
    assert "layer 5 is out of range: the model has 3 layers, indices 0..2" in capsys.readouterr().err
    assert main(["inspect", model, "--prompt", "to be", "--p", "1.5", "--out", out]) == 2
    assert "argument --p: expected a finite number in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["inspect", model, "--prompt", "to be", "--look-back", "0", "--out", out]) == 2
    assert "argument --look-back: expected an integer in [1, inf), got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
