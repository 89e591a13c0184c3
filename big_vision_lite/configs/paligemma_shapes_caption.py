"""PaliGemma captioning of the generated shapes: held-out `eval/caption_exact_match` >= 0.8 within 600 s on 2 cores.

    bvl train paligemma_shapes_caption --workdir W [--set key=value ...]

The vision tower starts from the SigLIP run of the `siglip_shapes` config: the task requires that run, so `bvl
train` trains it first (in the cache directory, about 2.5 minutes) when it is not there yet. The projector and a
small Gemma-style decoder train from scratch to write "a small red circle at the top left". `eval/` scores new
images of the trained (colour, shape) pairs, `eval/novel_pairs/` the pairs never seen in training (see
`train/tasks/paligemma.py: caption_eval_sources`). `get_config("smoke")` is a seconds-long run for tests (SigLIP
smoke tower, tiny decoder).
"""

import ml_collections

from big_vision_lite.configs import siglip_shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "smoke"):  # a typo must not silently train the full run
        raise ValueError(f"paligemma_shapes_caption takes no argument or :smoke, got :{arg}")
    c = ml_collections.ConfigDict()
    c.task = "paligemma"
    c.seed = 0
    c.total_steps = 2000
    c.batch_size = 64
    c.eval_batch_size = 180  # the 540 new trained-pair images in three generate calls, the 180 novel-pair ones in one
    c.log_every = 50
    c.eval_every = 500
    c.ckpt_every = 500
    c.keep_ckpts = 2

    # max_len: 16 image tokens + bos + "caption" + "\n" + the longest caption (9 tokens) + eos, with room to spare.
    c.text = dict(tokenizer="", vocab_size=256, max_len=32, prompt="caption")
    siglip_arg = "smoke" if arg == "smoke" else None
    c.init = dict(siglip_config="siglip_shapes" + (f":{siglip_arg}" if siglip_arg else ""), siglip_workdir="")
    # The SigLIP run's data: its held-out pairs are the novel pairs here too (the task refuses a mismatch).
    c.data = siglip_shapes.get_config(siglip_arg).data
    c.model = dict(
        llm=dict(width=128, depth=3, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=32, lora=None),
        dtype="float32", scan_layers=False, remat_policy=None)
    c.trainable = None  # regexes of the parameters to train, e.g. ["llm/layers"] or [".*lora_"]; None: all
    c.optimizer = dict(lr=1e-3, warmup_steps=50, end_lr_fraction=0.01, weight_decay=1e-4, b1=0.9, b2=0.95,
                       clip_norm=1.0)
    c.mesh = dict(data=-1, fsdp=1)
    c.sharding_rules = [(".*", "fsdp")]

    if arg == "smoke":
        c.total_steps, c.batch_size, c.eval_batch_size, c.log_every, c.eval_every, c.ckpt_every = 4, 8, 90, 2, 4, 2
        c.optimizer.warmup_steps = 1
        c.model.llm.update(width=32, depth=1, mlp_dim=64, num_heads=2, head_dim=16)
    return c
