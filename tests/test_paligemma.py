"""PaliGemma model: the prefix-LM mask against transformers', image-token placement, generation with images, and
the second expert (pi0 layout) with a reused prefix cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.decoding.engine import generate
from big_vision_lite.models.gemma import DecoderConfig
from big_vision_lite.models.masks import positions_from_mask, prefix_lm_mask
from big_vision_lite.models.paligemma import PaliGemma, PaliGemmaConfig, check_image_tokens, init_params
from big_vision_lite.models.vit import ViTConfig

VOCAB = 48
IMAGE_ID = VOCAB  # beyond the vocabulary, as transformers allows: never looked up
LLM = DecoderConfig(vocab_size=VOCAB, width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=8)
EXPERT = DecoderConfig(vocab_size=VOCAB, width=16, depth=2, mlp_dim=24, num_heads=4, num_kv_heads=1, head_dim=8)
VISION = ViTConfig(width=24, depth=1, mlp_dim=48, num_heads=2, patch_size=8, image_size=16, pool_type="none",
                   head_size=32)
CONFIG = PaliGemmaConfig(VISION, LLM, IMAGE_ID)
P = CONFIG.num_image_tokens


@pytest.fixture(scope="module")
def model():
    module = PaliGemma(CONFIG)
    return module, init_params(module, jax.random.key(0))


def _images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32)


def _prompts(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded image + text prompts: each row is P placeholders, then its text ids."""
    width = P + max(len(r) for r in rows)
    tokens, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids = [IMAGE_ID] * P + r
        tokens[i, width - len(ids):], mask[i, width - len(ids):] = ids, True
    return tokens, mask


def test_prefix_lm_mask_equals_transformers():
    torch = pytest.importorskip("torch")
    from transformers import GemmaConfig
    from transformers.masking_utils import create_causal_mask

    hf = GemmaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                     num_key_value_heads=1, head_dim=8, intermediate_size=8)
    hf._attn_implementation = "eager"
    rng = np.random.default_rng(0)
    batch, length = 6, 11
    input_mask = np.ones((batch, length), bool)
    token_types = np.zeros((batch, length), np.int64)
    for b in range(batch):
        left, right = rng.integers(0, 3), rng.integers(0, 3)  # padding on either side
        prefix = rng.integers(1, length - left - right)
        input_mask[b, :left] = False
        input_mask[b, length - right:] = False
        token_types[b, left + prefix:] = 1  # suffix (and the right padding after it)
    positions = np.maximum(np.cumsum(input_mask, 1) - 1, 0)
    theirs = create_causal_mask(
        config=hf, inputs_embeds=torch.zeros(batch, length, 8), attention_mask=torch.tensor(input_mask.astype(int)),
        cache=None, position_ids=torch.tensor(positions),
        block_sequence_ids=torch.where(torch.tensor(token_types) == 0, 0, -1))
    theirs = (theirs[:, 0] == 0).numpy()  # additive float mask -> allowed
    ours = np.asarray(prefix_lm_mask(jnp.asarray(input_mask), jnp.asarray(token_types)))
    # Queries at padding attend to nothing in ours and to something in theirs; neither is ever read.
    valid_queries = input_mask[:, :, None]
    np.testing.assert_array_equal(ours & valid_queries, theirs & valid_queries)
    assert not ours[~input_mask].any()
    for b in range(batch):  # the prefix never sees the suffix
        assert not ours[b][np.ix_(token_types[b] == 0, token_types[b] == 1)].any()


def test_image_tokens_fill_the_placeholders_unscaled(model):
    module, params = model
    tokens, mask = _prompts([[2, 5, 6], [2, 7]])
    positions = positions_from_mask(jnp.asarray(mask))
    attn = prefix_lm_mask(jnp.asarray(mask), jnp.zeros_like(jnp.asarray(mask)))
    _, _, out = module.apply({"params": params}, jnp.asarray(tokens), positions, attn, images=_images(2))
    x, image_tokens = np.asarray(out["embeddings"]), np.asarray(out["image_tokens"])
    np.testing.assert_array_equal(x[0, :P], image_tokens[0])
    np.testing.assert_array_equal(x[1, 1:P + 1], image_tokens[1])  # row 1 has one column of left padding
    table = np.asarray(params["llm"]["embedder"]["input_embedding"])
    np.testing.assert_allclose(x[0, P:], table[[2, 5, 6]] * np.sqrt(LLM.width), rtol=1e-6)  # text is scaled


def test_wrong_image_token_count_is_refused():
    tokens, _ = _prompts([[2, 5]])
    check_image_tokens(tokens, CONFIG)
    with pytest.raises(ValueError, match=rf"rows \[0\] hold \[{P - 1}\] image tokens.*exactly {P}"):
        check_image_tokens(tokens[:, 1:], CONFIG)


def test_generate_refuses_prompts_without_every_image_token(model):
    module, params = model
    tokens, mask = _prompts([[2, 5], [2, 7]])
    tokens[1, 0] = 9  # row 1 loses a placeholder
    with pytest.raises(ValueError, match=rf"rows \[1\] hold \[{P - 1}\] image tokens"):
        generate(module, params, tokens, mask, 2, images=_images(2), mask_ar=np.zeros_like(tokens))


@pytest.mark.parametrize(("change", "message"), [
    (dict(vision=ViTConfig(width=24, depth=1, mlp_dim=48, num_heads=2, patch_size=8, image_size=16,
                           pool_type="map", head_size=32)), "pool_type 'none'"),
    (dict(vision=ViTConfig(width=24, depth=1, mlp_dim=48, num_heads=2, patch_size=8, image_size=16,
                           pool_type="none", head_size=16)), "head_size 16.*decoder width 32"),
    (dict(image_token_id=-1), "image_token_id"),
])
def test_config_errors(change, message):
    fields = dict(vision=VISION, llm=LLM, image_token_id=IMAGE_ID) | change
    with pytest.raises(ValueError, match=message):
        PaliGemmaConfig(**fields)


def test_generation_with_images_matches_teacher_forcing(model):
    """Greedy ids from the cached decode loop equal the argmax of full prefix-LM forwards, row by row, in a
    batch whose prompts differ in length (left padding)."""
    module, params = model
    rows = [[2, 5, 6, 9], [2, 7]]
    tokens, mask = _prompts(rows)
    images = _images(2, seed=1)
    new = 4
    out = generate(module, params, tokens, mask, new, images=images, mask_ar=np.zeros_like(tokens)).tokens
    for b, row in enumerate(rows):
        ids = [IMAGE_ID] * P + row
        for step in range(new):
            t = jnp.asarray([ids])
            m = jnp.ones_like(t, bool)
            ar = jnp.asarray([[0] * (P + len(row)) + [1] * step])  # generated tokens are causal
            logits, _, _ = module.apply({"params": params}, t, positions_from_mask(m), prefix_lm_mask(m, ar),
                                        images=images[b:b + 1])
            ids.append(int(jnp.argmax(logits[0, -1])))
        assert out[b].tolist() == ids[-new:], b


TWO = PaliGemmaConfig(VISION, LLM, IMAGE_ID, experts=(EXPERT,))


@pytest.fixture(scope="module")
def two_experts():
    module = PaliGemma(TWO)
    return module, init_params(module, jax.random.key(1))


def test_suffix_pass_on_reused_prefix_cache_equals_joint_pass(two_experts):
    module, params = two_experts
    tokens, mask = _prompts([[2, 5, 6], [2, 7]])
    batch, prefix_len, suffix_len = tokens.shape[0], tokens.shape[1], 3
    prefix_mask = jnp.asarray(mask)
    suffix_mask = jnp.ones((batch, suffix_len), bool)
    input_mask = jnp.concatenate([prefix_mask, suffix_mask], axis=1)
    mask_ar = jnp.concatenate([jnp.zeros_like(prefix_mask), suffix_mask], axis=1)
    full = prefix_lm_mask(input_mask, mask_ar)  # [B, T + S, T + S]
    positions = positions_from_mask(input_mask)
    prefix = module.apply({"params": params}, jnp.asarray(tokens), _images(batch), method="embed")[0]
    apply = lambda xs, pos, attn, cache=None: module.apply(  # noqa: E731
        {"params": params}, xs, pos, attn, cache, method="experts_forward")

    (_, joint_suffix), _, _ = apply([prefix, _suffix(batch, suffix_len, 0)], positions, full)
    (prefix_out, _), cache, _ = apply([prefix, None], positions[:, :prefix_len], full[:, :prefix_len, :prefix_len])
    assert prefix_out is not None
    for seed in range(2):  # the same prefix cache serves several suffixes
        suffix = _suffix(batch, suffix_len, seed)
        (_, alone), _, _ = apply([None, suffix], positions[:, prefix_len:], full[:, prefix_len:], cache)
        if seed == 0:
            np.testing.assert_allclose(np.asarray(alone), np.asarray(joint_suffix), rtol=2e-5, atol=2e-5)
        else:
            (_, joint), _, _ = apply([prefix, suffix], positions, full)
            np.testing.assert_allclose(np.asarray(alone), np.asarray(joint), rtol=2e-5, atol=2e-5)


def _suffix(batch: int, length: int, seed: int) -> jax.Array:
    return jax.random.normal(jax.random.key(100 + seed), (batch, length, EXPERT.width))


def test_single_expert_checkpoint_loads_into_expert_zero(model, two_experts):
    single_module, single = model
    module, params = two_experts
    flat_single = dict(jax.tree_util.tree_leaves_with_path(single))
    flat_two = dict(jax.tree_util.tree_leaves_with_path(params))
    assert set(flat_single) < set(flat_two)  # expert 0's names are exactly the single model's
    for path, leaf in flat_single.items():
        assert flat_two[path].shape == leaf.shape, path
    merged = jax.tree_util.tree_map_with_path(lambda path, leaf: flat_single.get(path, leaf), params)

    tokens, mask = _prompts([[2, 5, 6]])
    m = jnp.asarray(mask)
    args = (jnp.asarray(tokens), positions_from_mask(m), prefix_lm_mask(m, jnp.zeros_like(m)))
    ours, _, _ = module.apply({"params": merged}, *args, images=_images(1))
    reference, _, _ = single_module.apply({"params": single}, *args, images=_images(1))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))
