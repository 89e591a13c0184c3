"""Packaged experiment configs, big_vision style: each file's `get_config(arg=None)` returns a `ConfigDict`.

`bvl train NAME[:ARG]` runs one from any directory (`train.config.load_config` resolves bare names here):

    siglip_shapes             SigLIP from scratch on the generated shapes (args: demo, smoke)
    paligemma_shapes_caption  PaliGemma captioning of the shapes on a SigLIP tower (arg: smoke)

Decoder architectures are not configured here: they come from a checkpoint's config.json or a DecoderConfig.
"""
