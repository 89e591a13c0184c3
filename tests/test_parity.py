"""Golden-value parity against transformers on tiny random checkpoints of every family, and the `bvl` CLI."""

import dataclasses
import json

import numpy as np
import pytest

import big_vision_lite.parity as parity
from big_vision_lite.cli import main
from big_vision_lite.parity import report as report_module
from big_vision_lite.parity.decoder import greedy_batch
from big_vision_lite.parity.report import LayerError, ParityReport, TruthError, compare_stage

from conftest import TINY_FAMILIES


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_tiny_family_matches_transformers(tiny_checkpoints, family):
    report = parity.run_parity(str(tiny_checkpoints[family]))
    assert report.max_rel_err <= 1e-5, report.table()
    # 32 greedy ids for 4 left-padded prompts of different lengths, ours against transformers' generate.
    assert report.greedy_match and len(report.greedy_ours) == 4, report.table()
    assert {len(row) for row in report.greedy_ours} == {32}
    assert report.ok and report.tolerance == 1e-5
    config = json.loads((tiny_checkpoints[family] / "config.json").read_text())
    assert [e.name for e in report.layers] == ["embeddings", *[f"layer_{i}" for i in range(
        config["num_hidden_layers"])], "final_norm", "logits"]


def test_parity_detects_a_wrong_sliding_window(tiny_checkpoints, monkeypatch):
    """A check that cannot fail proves nothing: give our side a window one token too wide."""
    real_load = parity.load

    def widened(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        cfg = dataclasses.replace(loaded.config, sliding_window=loaded.config.sliding_window + 1)
        return dataclasses.replace(loaded, module=loaded.module.clone(configs=(cfg,)), config=cfg)

    monkeypatch.setattr(parity, "load", widened)
    report = parity.run_parity(str(tiny_checkpoints["gemma2"]), greedy_tokens=2)
    assert not report.ok and report.max_rel_err > 1e-3
    assert report.layers[0].rel_err == 0.0  # embeddings do not depend on the window


def _config_defect(**changes):
    def plant(loaded):
        cfg = dataclasses.replace(loaded.config, **changes)
        return dataclasses.replace(loaded, module=loaded.module.clone(configs=(cfg,)), config=cfg)
    return plant


def _transposed_output_projection(loaded):
    """attn_vec_einsum [L, N, H, D] read as the transposed [D, N*H] matrix (square: N * H == D)."""
    w = np.asarray(loaded.params["layers"]["attn"]["attn_vec_einsum"]["w"])
    layers, heads, head_dim, width = w.shape
    assert heads * head_dim == width
    flipped = w.reshape(layers, width, width).transpose(0, 2, 1).reshape(w.shape)
    params = {**loaded.params, "layers": {**loaded.params["layers"], "attn": {
        **loaded.params["layers"]["attn"], "attn_vec_einsum": {"w": flipped}}}}
    return dataclasses.replace(loaded, params=params)


PLANTED_DEFECTS = {  # defect -> (tiny family, how our side is broken, the sub-stage that must be named)
    "rope base": ("gemma2", _config_defect(rope_theta=20_000.0), "q"),
    "query scale": ("gemma2", _config_defect(query_pre_attn_scalar=None), "logits"),
    "missing soft-cap": ("gemma2", _config_defect(attn_logit_softcap=None), "logits_capped"),
    "norm offset": ("gemma2", _config_defect(norm_plus_one=False), "normed"),
    "activation": ("gemma2", _config_defect(activation="silu"), "mlp_hidden"),
    "transposed projection": ("gemma_mha", _transposed_output_projection, "attn_out"),
    "qk-norm missing": ("qwen3", _config_defect(qk_norm=False), "q"),
}


@pytest.mark.parametrize("defect", list(PLANTED_DEFECTS))
def test_drill_down_names_the_stage_of_a_planted_defect(tiny_checkpoints, monkeypatch, defect):
    """One defect per stage kind, planted in our model only: the first layer out of tolerance is drilled down
    (the RoPE base of gemma2's full-attention layers first shows in layer 1; the rest in layer 0) and its
    drill-down names the first sub-stage the defect reaches."""
    family, plant, stage = PLANTED_DEFECTS[defect]
    real_load = parity.load
    monkeypatch.setattr(parity, "load", lambda *a, **k: plant(real_load(*a, **k)))
    report = parity.run_parity(str(tiny_checkpoints[family]), greedy_tokens=2)
    drill = report.drill_down
    first_bad = next(e.name for e in report.layers if e.rel_err > 1e-5)
    assert not report.ok and drill is not None and drill.layer == first_bad, report.table()
    assert first_bad == ("layer_1" if defect == "rope base" else "layer_0")
    assert drill.first_broken == stage, report.table()
    errors = {e.name: e.rel_err for e in drill.stages}
    names = list(errors)
    assert names[0] == "normed" and names[-1] == "output"
    assert all(errors[name] <= 1e-5 for name in names[:names.index(stage)])  # the stages before
    assert errors[stage] > 1e-3
    data = report.to_json()["drill_down"]
    assert data["first_broken"] == stage and len(data["stages"]) == len(errors)
    assert f"first sub-stage out of tolerance: {stage}" in report.table()


def test_a_passing_run_has_no_drill_down(tiny_checkpoints):
    report = parity.run_parity(str(tiny_checkpoints["gemma2"]), greedy_tokens=2)
    assert report.ok and report.drill_down is None and report.to_json()["drill_down"] is None


def test_cli_parity_writes_json_and_exit_status(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert main(["parity", str(tiny_checkpoints["qwen3"]), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model_type"] == "qwen3" and report["dtype"] == "float32" and report["ok"] is True
    assert report["greedy_match"] is True and report["max_rel_err"] <= 1e-5 and len(report["layers"]) == 5
    assert "logits" in capsys.readouterr().out
    # An impossible tolerance fails the run with exit status 1.
    assert main(["parity", str(tiny_checkpoints["qwen3"]), "--tolerance", "0"]) == 1


def test_cli_bfloat16_parity(tiny_checkpoints, tmp_path):
    out = tmp_path / "parity.json"
    assert main(["parity", str(tiny_checkpoints["gemma3"]), "--dtype", "bfloat16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and 0 < report["max_rel_err"] <= report["tolerance"] == 3e-2
    # Per row, the leading ids that agree, counted from the ids the report holds (bfloat16 rounding may part the
    # two sides at any step, so only the count is checked, not where it ends).
    leading = [next((i for i, (a, b) in enumerate(zip(o, r, strict=True)) if a != b), len(o))
               for o, r in zip(report["greedy_ours"], report["greedy_ref"], strict=True)]
    assert report["greedy_agree"] == leading and len(leading) == 4
    assert report["greedy_match"] == (leading == [32] * 4)


def test_bfloat16_is_judged_against_the_float32_truth(tiny_checkpoints, monkeypatch):
    """Both bfloat16 sides measured against transformers in float32: ours is about as far from it as transformers'
    (the run passes); a query scale 10% off keeps the side-by-side error near bfloat16's tolerance but puts ours
    >3x further from the truth than transformers' in every layer: the run fails on the truth."""
    clean = parity.run_parity(str(tiny_checkpoints["gemma2"]), "bfloat16", greedy_tokens=4)
    assert clean.truth_dtype == "float32" and [t.name for t in clean.truth] == [e.name for e in clean.layers]
    assert clean.ok and all(t.passes and t.ref_rel_err > 1e-3 for t in clean.truth[1:]), clean.table()
    assert clean.truth[0].ours_rel_err == clean.truth[0].ref_rel_err  # the same rounded embeddings on both sides
    assert "ours~truth" in clean.table() and clean.to_json()["truth_factor"] == report_module.TRUTH_FACTOR

    real_load = parity.load
    monkeypatch.setattr(parity, "load", lambda *a, **k: _config_defect(query_pre_attn_scalar=20)(real_load(*a, **k)))
    broken = parity.run_parity(str(tiny_checkpoints["gemma2"]), "bfloat16", greedy_tokens=4)
    assert not broken.ok and broken.max_rel_err < 0.05, broken.table()
    assert all(not t.passes and t.ours_rel_err > 3 * t.ref_rel_err for t in broken.truth[1:]), broken.table()
    assert [t["passes"] for t in broken.to_json()["truth"]] == [True] + [False] * (len(broken.truth) - 1)


def test_truth_verdict_rules():
    """With a truth, the tolerance no longer decides: each stage passes within TRUTH_FACTOR of transformers' error
    against the truth, errors under TRUTH_FLOOR counting as none; a NaN fails."""
    factor, floor = report_module.TRUTH_FACTOR, report_module.TRUTH_FLOOR
    assert TruthError("x", factor * 1e-2, 1e-2).passes and not TruthError("x", factor * 1.01e-2, 1e-2).passes
    assert TruthError("x", factor * floor, 0.0).passes and not TruthError("x", float("nan"), 1e-2).passes
    layers = [LayerError("logits", 1.0, 5e-2)]  # beyond the 3e-2 tolerance ...
    report = ParityReport("m", "gemma", "bfloat16", 3e-2, layers, None, None, {},
                          truth=[TruthError("logits", 6e-2, 5e-2)], truth_dtype="float32")
    assert report.ok  # ... but no further from the truth than transformers
    report.truth = [TruthError("logits", 6e-2, 1e-2)]
    assert not report.ok and "!" in report.table().splitlines()[2]


def test_cli_input_errors_exit_2_without_traceback(tiny_checkpoints, tmp_path, capsys):
    assert main(["parity", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "gemma3-270m" in err and "smollm2-135m" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert main(["parity", str(bad)]) == 2
    assert "model_type 'mamba' is not supported" in capsys.readouterr().err
    assert main(["parity", str(tiny_checkpoints["llama"]), "--seq-len", "0"]) == 2


def test_greedy_batch_has_four_left_padded_lengths():
    tokens, mask = greedy_batch(96, 32)
    assert tokens.shape == (4, 32) and mask.sum(1).tolist() == [32, 24, 16, 8]
    assert mask[:, -1].all() and (tokens[~mask] == 0).all() and (tokens[mask] > 0).all()


def test_report_ok_and_greedy_agreement_rules():
    layers = [LayerError("logits", 1.0, 2e-6)]
    ours, ref = [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]
    report = ParityReport("m", "llama", "float32", 1e-5, layers, ours, ref, {})
    assert report.greedy_agree == [3, 1] and not report.greedy_match and not report.ok
    report.greedy_ref = [[1, 2, 3], [4, 5, 6]]
    assert report.ok
    report.layers = [LayerError("logits", 1.0, 2e-5)]
    assert not report.ok
    # Differing ids without margins are never explained away, in bfloat16 either.
    bf16 = dataclasses.replace(report, dtype="bfloat16", tolerance=3e-2, greedy_ref=[[1, 2, 3], [7, 7, 7]])
    assert not bf16.ok and bf16.greedy_agree == [3, 0] and not bf16.divergences[0].near_tie
    # An encoder decodes nothing: greedy fields are null and the error bound alone decides.
    encoder = ParityReport("s", "siglip", "float32", 1e-5, [LayerError("loss", 0.1, 3e-6)], None, None,
                                  {}, notes=["no head"])
    data = encoder.to_json()
    assert encoder.ok and data["greedy_match"] is None and data["greedy_agree"] is None and data["notes"] == ["no head"]
    assert "note: no head" in encoder.table() and "greedy" not in encoder.table()
    assert not dataclasses.replace(encoder, layers=[LayerError("loss", 0.1, 2e-5)]).ok


def test_greedy_divergence_is_a_near_tie_only_below_twice_the_logit_error():
    """Row 1 parts at step 1. The forward logits differ by at most 0.05, so two logits 0.08 apart may swap by
    rounding (0.08 < 2 x 0.05): a near-tie, and the run passes; 0.5 apart they cannot: a defect, and it fails."""
    ours, ref = [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]
    margins = lambda m: [[3.0, 3.0, 3.0], [2.0, m, 1.0]]  # noqa: E731
    tied = ParityReport("m", "gemma", "bfloat16", 3e-2, [LayerError("logits", 0.05, 1e-3)], ours, ref, {},
                        greedy_margins_ours=margins(0.08), greedy_margins_ref=margins(0.09))
    [d] = tied.divergences
    assert (d.row, d.step, d.id_ours, d.id_ref, d.near_tie) == (1, 1, 5, 9, True) and tied.ok
    data = tied.to_json()
    assert data["divergences"][0]["margin_ours"] == 0.08 and data["near_tie_below"] == 0.1
    assert "diverges at step 1" in tied.table() and "near-tie (rounding)" in tied.table()
    defect = dataclasses.replace(tied, greedy_margins_ours=margins(0.5), greedy_margins_ref=margins(0.5))
    assert not defect.divergences[0].near_tie and not defect.ok and "DEFECT" in defect.table()
    # One side's small margin is enough: the other side's logits may be the ones rounding moved.
    assert dataclasses.replace(defect, greedy_margins_ref=margins(0.01)).ok
    # float32 follows the same rule.
    assert dataclasses.replace(tied, dtype="float32", tolerance=1.0).ok


def test_a_nan_or_inf_anywhere_fails_the_report():
    """A NaN must never hide behind a Python `max` over finite errors (bfloat16 parity once passed on NaN logits)."""
    ref = np.ones((2, 3))
    nan = compare_stage("logits", np.where(np.eye(2, 3), np.nan, 1.0), ref, np.ones(2, bool))
    assert nan.nonfinite == 2 and nan.rel_err == nan.max_abs_err == float("inf")
    inf = compare_stage("logits", ref, np.full((2, 3), np.inf), np.ones(2, bool))
    assert inf.nonfinite == 6 and inf.rel_err == float("inf")
    # A non-finite value on a padding token is not compared.
    assert compare_stage("x", np.array([[1.0], [np.nan]]), np.ones((2, 1)), np.array([True, False])).nonfinite == 0
    layers = [LayerError("embeddings", 0.0, 0.0), nan, LayerError("final", 1e-7, 1e-7)]
    report = ParityReport("m", "gemma", "bfloat16", 3e-2, layers, None, None, {})
    assert report.max_rel_err == float("inf") and not report.ok
    data = report.to_json()
    assert data["ok"] is False and data["max_rel_err"] == "inf" and data["layers"][1]["nonfinite"] == 2
    json.dumps(data)  # strict JSON: inf is written as a string
    assert "2 NaN/inf values" in report.table()


def test_parity_fails_on_nan_logits(tiny_checkpoints, monkeypatch):
    """End to end: our side producing NaN logits makes the run fail, in bfloat16 too."""
    real = parity.decoder._our_forward

    def nan_logits(*args):
        ours = real(*args)
        ours["logits"] = ours["logits"].copy()
        ours["logits"][0, -1, 0] = np.nan
        return ours

    monkeypatch.setattr(parity.decoder, "_our_forward", nan_logits)
    report = parity.run_parity(str(tiny_checkpoints["gemma3"]), "bfloat16", greedy_tokens=2)
    errors = {e.name: e for e in report.layers}
    assert not report.ok and errors["logits"].nonfinite == 1 and errors["final_norm"].nonfinite == 0
