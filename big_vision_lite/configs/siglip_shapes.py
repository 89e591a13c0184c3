"""SigLIP from scratch on the generated shapes dataset: held-out i2t top-1 >= 0.9 within 300 s on 2 CPU cores.

    bvl train siglip_shapes --workdir W [--set key=value ...]

The evaluation split holds (colour, shape) pairs never seen in training, so retrieval there measures
composition, not memory. `get_config("demo")` is the minute-long run of `bvl demo`; `get_config("smoke")` a
seconds-long one for tests.
"""

import ml_collections

ARGS = (None, "demo", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in ARGS:  # a typo must not silently train the full run
        raise ValueError(f"siglip_shapes takes no argument, :demo or :smoke, got :{arg}")
    c = ml_collections.ConfigDict()
    c.task = "siglip"
    c.seed = 0
    c.total_steps = 1200
    c.batch_size = 256
    c.accum_steps = 1
    c.log_every = 20
    c.eval_every = 200
    c.ckpt_every = 200
    c.keep_ckpts = 2

    # 8 colours x 5 shapes: 10 of the 40 (colour, shape) pairs held out, every colour still seen with 3-4 shapes.
    c.data = dict(name="shapes", image_size=32, seed=0, holdout_fraction=0.25, workers=0, path="", eval_path="",
                  colours=("red", "green", "blue", "yellow", "purple", "white", "orange", "cyan"),
                  shapes=("circle", "square", "triangle", "cross", "diamond"))
    c.text = dict(tokenizer="", vocab_size=256, max_len=16)
    # out_dim: no linear head on the image side (the MAP head's output is the embedding) and a text head to the
    # image width: the layout transformers' SiglipModel has, so a trained model exports to it.
    c.model = dict(
        image=dict(width=128, depth=3, mlp_dim=256, num_heads=4, patch_size=8, pool_type="map"),
        text=dict(width=128, depth=2, mlp_dim=256, num_heads=4),
        out_dim=(None, 128), temperature_init=10.0, bias_init=-10.0, dtype="float32", scan_layers=False,
        remat_policy=None)
    c.loss = dict(impl="dense", block_size=128)
    c.optimizer = dict(lr=1e-3, warmup_steps=100, end_lr_fraction=0.01, weight_decay=1e-4, b1=0.9, b2=0.95,
                       clip_norm=1.0)
    c.mesh = dict(data=-1, fsdp=1)
    c.sharding_rules = [(".*", "fsdp")]  # with fsdp=1 this replicates; raise mesh.fsdp to shard the params

    if arg == "demo":  # `bvl demo`: about a minute, held-out i2t around 0.6-0.7
        c.total_steps, c.eval_every, c.ckpt_every = 300, 150, 150
    if arg == "smoke":
        c.total_steps, c.batch_size, c.log_every, c.eval_every, c.ckpt_every = 6, 16, 2, 3, 3
        c.optimizer.warmup_steps = 2
        c.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
        c.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
        c.model.out_dim = (None, 32)
    return c
