import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transformer.cli import apply_overrides, load_preset
from transformer.config import Config, ModelConfig
from transformer.model.decoder import DecoderLM, analytic_param_count, count_params
from transformer.tasks.losses import cross_entropy

TINY = ModelConfig(vocab_size=23, d_model=24, n_heads=3, n_layers=2, max_len=11)


def build(**kw):
    return DecoderLM(dataclasses.replace(TINY, **kw), rngs=nnx.Rngs(0))


def tokens(seed=0, B=2, T=11):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, TINY.vocab_size)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rotary"])
def test_causal_future_tokens_do_not_change_past_logits(positions):
    model = build(positions=positions)
    x = tokens()
    t = 5
    y = x.at[:, t + 1:].set((x[:, t + 1:] + 1) % TINY.vocab_size)
    a, b = model(x), model(y)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rotary"])
def test_permuting_the_input_changes_the_output_when_positions_are_on(positions):
    model = build(positions=positions)
    x = tokens(1)
    perm = jnp.array([3, 0, 7, 1, 9, 2, 10, 4, 6, 5, 8])
    # Without positions, a causal model's last logit is a function of the token multiset; with them it is not.
    # One causal layer without positions sees its past as a set: the last logit is the same under any permutation
    # of the earlier tokens. Positions must break that.
    keep_last = perm[perm != 10].tolist() + [10]
    # (At init token embeddings are small next to sinusoids, so the sinusoidal effect is small but far above the
    # float32 noise of the position-free model, ~1e-7.)
    with_pos = build(positions=positions, n_layers=1)
    assert np.abs(with_pos(x)[:, -1] - with_pos(x[:, keep_last])[:, -1]).max() > 2e-6
    nopos = build(positions="none", n_layers=1)
    np.testing.assert_allclose(nopos(x)[:, -1], nopos(x[:, keep_last])[:, -1], rtol=0, atol=5e-7)
    # and the full model's outputs move when the whole sequence is permuted
    assert not np.allclose(model(x)[:, -1], model(x[:, perm])[:, -1], atol=1e-4)


@pytest.mark.parametrize("kw", [
    {}, {"tie_embeddings": False}, {"use_bias": True}, {"activation": "swiglu"}, {"norm": "rmsnorm"},
    {"norm_position": "post"}, {"positions": "rotary", "use_bias": True, "tie_embeddings": False},
    {"d_ff": 40, "positions": "sinusoidal", "activation": "relu"},
    {"n_kv_heads": 1, "qkv_bias": True, "positions": "rotary"}, {"head_dim": 10, "n_kv_heads": 1, "use_bias": True},
])
def test_parameter_count_matches_the_formula(kw):
    cfg = dataclasses.replace(TINY, **kw)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    assert count_params(model) == analytic_param_count(cfg)


def test_gpt2_small_preset_has_124m_parameters_without_allocating():
    cfg = apply_overrides(Config(), load_preset("gpt2_small"))
    m = dataclasses.replace(cfg.model, vocab_size=50257)
    abstract = nnx.eval_shape(lambda: DecoderLM(m, rngs=nnx.Rngs(0)))
    n = count_params(abstract)
    assert n == analytic_param_count(m)
    assert 123e6 < n < 125e6  # GPT-2 small: 124M with a 50257 vocabulary


@pytest.mark.parametrize("preset, vocab, want", [
    ("llama3_2_1b", 128_256, 1_235_814_400),  # Llama-3.2-1B as Hugging Face counts it (tied embeddings)
    ("gpt2_medium", 50_257, 354_823_168),  # GPT-2 medium (gpt2-medium on the hub)
])
def test_large_presets_have_their_models_parameter_counts_without_allocating(preset, vocab, want):
    cfg = apply_overrides(Config(), load_preset(preset))
    m = dataclasses.replace(cfg.model, vocab_size=vocab)
    assert count_params(nnx.eval_shape(lambda: DecoderLM(m, rngs=nnx.Rngs(0)))) == analytic_param_count(m) == want


def test_tiny_model_overfits_one_batch():
    model = build()
    graphdef, params = nnx.split(model, nnx.Param)
    x = tokens(2, B=4)
    y = jnp.roll(x, -1, axis=1)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        loss, g = jax.value_and_grad(lambda p: cross_entropy(nnx.merge(graphdef, p)(x), y))(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    first = None
    for _ in range(150):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    assert first > 2.5 and float(loss) < 0.05


def test_jit_equals_eager_and_bf16_is_close():
    model = build()
    x = tokens(3)
    eager = model(x)
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)
    bf16 = build(dtype="bfloat16")(x)
    assert bf16.dtype == jnp.float32  # logits stay float32
    np.testing.assert_allclose(bf16, eager, atol=0.1)


def _repeat_kv_into_mha(gqa_params, G: int) -> dict:
    """The same weights as plain multi-head attention: each key/value head copied to its G query heads."""
    pure = nnx.to_pure_dict(gqa_params)
    for blk in pure["blocks"].values():
        a = blk["attn"]
        w_k, w_v = (np.repeat(a["w_kv_DCKH"][:, c], G, axis=1) for c in (0, 1))
        b_k, b_v = (np.repeat(a["b_kv_CKH"][c], G, axis=0) for c in (0, 1))
        blk["attn"] = {"w_qkv_DCNH": np.stack([a["w_q_DNH"], w_k, w_v], axis=1),
                       "b_qkv_CNH": np.stack([a["b_q_NH"], b_k, b_v]), "w_o_NHD": a["w_o_NHD"]}
    return pure


@pytest.mark.parametrize("n_kv_heads", [1, 3])
def test_grouped_query_model_equals_multi_head_with_repeated_kv_heads(n_kv_heads):
    """n_kv_heads == n_heads is plain multi-head attention (the fused q/k/v path); a GQA model is exactly that model
    with each key/value head repeated over its group (multi-query at n_kv_heads=1)."""
    kw = dict(n_heads=6, d_model=36, positions="rotary", norm="rmsnorm", activation="swiglu", qkv_bias=True)
    gqa_cfg = dataclasses.replace(TINY, n_kv_heads=n_kv_heads, **kw)
    gqa = DecoderLM(gqa_cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(gqa, nnx.Param)
    params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(1), p.shape), params)  # biases != 0
    nnx.update(gqa, params)
    mha = DecoderLM(dataclasses.replace(TINY, **kw), rngs=nnx.Rngs(5))
    _, mha_params = nnx.split(mha, nnx.Param)
    nnx.replace_by_pure_dict(mha_params, _repeat_kv_into_mha(params, 6 // n_kv_heads))
    nnx.update(mha, mha_params)
    x = jax.random.randint(jax.random.key(2), (2, 11), 0, TINY.vocab_size)
    np.testing.assert_allclose(gqa(x), mha(x), rtol=1e-5, atol=1e-5)
    assert count_params(gqa) == analytic_param_count(gqa_cfg) < count_params(mha)


def test_a_3_kv_head_cache_holds_a_third_of_the_9_head_one():
    cfg = dataclasses.replace(TINY, d_model=72, n_heads=9, positions="rotary")
    nbytes = lambda c: sum(x.nbytes for x in jax.tree.leaves(c))  # noqa: E731
    full = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))).init_cache(2, 32)
    grouped = DecoderLM(dataclasses.replace(cfg, n_kv_heads=3), rngs=nnx.Rngs(0)).init_cache(2, 32)
    assert nbytes(grouped) * 3 == nbytes(full) > 0
    assert grouped[0]["k"].shape == (2, 3, 8, 32) and grouped[0]["v"].shape == (2, 3, 32, 8)
