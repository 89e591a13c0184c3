"""`bvl demo` end to end in its short mode: a tiny gemma3 checkpoint with a tokenizer for the parity and generation
steps and the seconds-long `siglip_shapes:smoke` run, in a fresh cache. All three steps must succeed (exit 0),
print what the user reads (the parity table, the completions, the training summary) and leave the SigLIP run's
files where the demo says it trains: `$BVL_CACHE_DIR/demo/siglip_shapes`."""

import json

from big_vision_lite.cli import DEMO_PROMPTS, main


def test_demo_short_mode_runs_all_three_steps(tiny_with_tokenizer, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BVL_CACHE_DIR", str(cache))
    workdir = cache / "demo" / "siglip_shapes"
    workdir.mkdir(parents=True)
    (workdir / "stale.txt").write_text("from an earlier demo")  # the demo trains from scratch: this must go

    status = main(["demo", "--model", str(tiny_with_tokenizer), "--siglip", "smoke"])
    out, err = capsys.readouterr()
    assert status == 0, out[-3000:] + err[-3000:]

    # The three sections, in order.
    headers = ["== Golden-value parity", "== Greedy generation from", "== SigLIP from scratch"]
    positions = [out.index(h) for h in headers]
    assert positions == sorted(positions)
    parity, generation, siglip = (out[a:b] for a, b in zip(positions, [*positions[1:], len(out)], strict=True))
    # Parity: the per-stage table of the model it compared (the tiny one, not the packaged default), passed.
    assert f"parity {tiny_with_tokenizer.name} (gemma3_text" in parity
    assert "max_abs_err" in parity and "rel_err" in parity and "ok: True" in parity
    # Generation: one completion block per demo prompt (its header, then the prompt and its continuation), then the
    # timing line.
    for prompt in DEMO_PROMPTS:
        assert f"--- {prompt!r}\n{prompt}" in generation, prompt
    assert "new tokens in" in generation and "tokens/s" in generation
    # SigLIP: the smoke run's 6 steps, evaluated, in the demo's workdir.
    assert f"trained 6 steps in {workdir}" in siglip and "eval/i2t_top1" in siglip

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == 6
    assert any("eval/i2t_top1" in r for r in records)
    assert (workdir / "checkpoints" / "6").is_dir()
    assert not (workdir / "stale.txt").exists()
