"""SigLIP 2 with NaFlex from scratch on the generated shapes, each image drawn at mixed aspect ratios: the
`siglip_shapes` run with a NaFlex image tower (16 patches at most; a 4 x 4 position grid resized per image).

    bvl train siglip2_shapes --workdir W [--set key=value ...]

Every image is drawn again at one of five patch grids, square to 1:4 (4x4, 3x5, 5x3, 2x8, 8x2); retrieval is
scored on the held-out (colour, shape) pairs, each drawn at all five. `get_config("demo")`: a minute-long run;
`get_config("smoke")`: seconds, for tests.
"""

import ml_collections

from big_vision_lite.configs import siglip_shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in siglip_shapes.ARGS:
        raise ValueError(f"siglip2_shapes takes no argument, :demo or :smoke, got :{arg}")
    c = siglip_shapes.get_config(arg)
    c.model.image.naflex = True  # 32-px images in 8-px patches: the position grid is 4 x 4
    c.naflex = dict(max_num_patches=16, grids=((4, 4), (3, 5), (5, 3), (2, 8), (8, 2)))
    return c
