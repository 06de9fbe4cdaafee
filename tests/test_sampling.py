import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.config import ModelConfig
from transformer.infer.sampling import (
    Sampler,
    generate,
    min_p_filter,
    repetition_penalty_filter,
    seen_tokens,
    top_k_filter,
    top_p_filter,
)
from transformer.model import DecoderLM
from transformer.model.attention import causal_mask, padding_mask

CFG = ModelConfig(vocab_size=23, d_model=24, n_heads=3, n_layers=2, max_len=16)


def split(**kw):
    model = DecoderLM(dataclasses.replace(CFG, **kw), rngs=nnx.Rngs(3))
    return model, *nnx.split(model)


def full_logits(model, seq):
    return model(jnp.asarray([seq]))[0]


@pytest.mark.parametrize("kw", [{"positions": "learned"}, {"positions": "sinusoidal"}, {"positions": "rotary"},
                                {"positions": "rotary", "n_kv_heads": 1}, {"positions": "rotary", "sliding_window": 4}])
def test_kv_cache_decoding_equals_full_forward_at_every_position(kw):
    model, _, _ = split(**kw)
    window = model.cfg.sliding_window
    seq = jax.random.randint(jax.random.key(1), (2, 13), 0, 23)
    ref = model(seq)
    P, S = 5, 16
    cache = model.init_cache(2, S)
    slots = jnp.arange(S)
    valid = jnp.ones((2, S), bool)
    mask = causal_mask(jnp.arange(P)[None], slots[None], window) & padding_mask(valid)
    pos = jnp.broadcast_to(jnp.arange(P), (2, P))
    logits, cache = model(seq[:, :P], positions_BT=pos, mask_B1TS=mask, cache=cache, cache_index=0)
    np.testing.assert_allclose(logits, ref[:, :P], rtol=1e-5, atol=1e-5)
    for t in range(P, 13):
        mask = causal_mask(jnp.full((1, 1), t), slots[None], window)
        step, cache = model(seq[:, t:t + 1], positions_BT=jnp.full((2, 1), t), mask_B1TS=mask, cache=cache,
                            cache_index=t)
        np.testing.assert_allclose(step[:, 0], ref[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"positions": "rotary", "n_kv_heads": 1, "sliding_window": 4}])
def test_greedy_generate_equals_argmax_loop_over_full_forward(kw):
    model, graphdef, state = split(**kw)
    prompt = [3, 1, 4, 1, 5]
    out = generate(graphdef, state, [prompt], max_new_tokens=9, max_len=16, sampler=Sampler(0.0)).tokens[0]
    forward = jax.jit(lambda seq_T: model(seq_T[None])[0])  # causal: padding after position t changes nothing
    seq = list(prompt)
    for _ in range(9):
        seq.append(int(jnp.argmax(forward(jnp.asarray(seq + [0] * (16 - len(seq))))[len(seq) - 1])))
    assert out == seq[len(prompt):]


def test_top1_and_tiny_temperature_equal_greedy():
    _, graphdef, state = split()
    prompts = [[3, 1, 4], [2, 7, 1, 8, 2, 8]]
    kw = dict(max_new_tokens=10, max_len=16, key=jax.random.key(7))
    greedy = generate(graphdef, state, prompts, sampler=Sampler(0.0), **kw).tokens
    assert generate(graphdef, state, prompts, sampler=Sampler(1.0, top_k=1), **kw).tokens == greedy
    assert generate(graphdef, state, prompts, sampler=Sampler(1e-4), **kw).tokens == greedy
    sampled = generate(graphdef, state, prompts, sampler=Sampler(1.5), **kw).tokens
    assert sampled != greedy  # a real sampler at high temperature departs from argmax


def test_top_p_hand_computed_case():
    probs = jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = jnp.log(probs)
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0].tolist()
    assert kept(0.5) == [True, False, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, True, False, False, False]  # 0.5 + 0.2 = 0.7 >= 0.6
    assert kept(0.8) == [True, True, True, False, False]  # 0.85
    assert kept(0.01) == [True, False, False, False, False]  # always at least one token
    assert kept(1.0) == [True] * 5
    shuffled = jnp.log(jnp.array([[0.1, 0.5, 0.05, 0.2, 0.15]]))
    assert np.isfinite(np.asarray(top_p_filter(shuffled, 0.6)))[0].tolist() == [False, True, False, True, False]


def test_top_p_at_an_exact_boundary_keeps_no_further_tokens():
    """0.5 + 0.3 reaches p = 0.8 exactly, but the float32 softmax sums to a hair under it: the two 0.1 tokens (tied
    with each other, not with the last kept token) must not be kept."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.1]]))
    assert np.isfinite(np.asarray(top_p_filter(logits, 0.8)))[0].tolist() == [True, True, False, False]
    tied = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1]]))  # ties with the last kept token stay
    assert np.isfinite(np.asarray(top_p_filter(tied, 0.8)))[0].tolist() == [True] * 4


def test_top_k_edges_and_ties():
    logits = jnp.array([[1.0, 3.0, 2.0, 3.0, 0.0]])
    finite = lambda x: np.isfinite(np.asarray(x))[0].tolist()
    assert finite(top_k_filter(logits, 1)) == [False, True, False, True, False]  # ties at the k-th are kept
    assert finite(top_k_filter(logits, 3)) == [False, True, True, True, False]
    assert finite(top_k_filter(logits, 5)) == [True] * 5
    assert finite(top_k_filter(logits, 50)) == [True] * 5
    assert finite(top_k_filter(logits, 0)) == [True] * 5


def test_empirical_frequencies_match_the_filtered_softmax():
    logits = jnp.log(jnp.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.07]))[None]
    sampler = Sampler(temperature=0.7, top_k=4, top_p=0.9)
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.jit(jax.vmap(lambda k: sampler(logits, k[None])[0]))(keys)
    counts = np.bincount(np.asarray(draws), minlength=6)
    expected_p = np.asarray(jax.nn.softmax(sampler.filter(logits))[0])
    assert counts[expected_p == 0].sum() == 0
    support = expected_p > 0
    chi2 = (((counts - n * expected_p) ** 2)[support] / (n * expected_p[support])).sum()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    # A filter that forgot the temperature would fail the same bound.
    wrong = np.asarray(jax.nn.softmax(top_p_filter(top_k_filter(logits, 4), 0.9))[0])
    chi2_wrong = (((counts - n * wrong) ** 2)[wrong > 0] / (n * wrong[wrong > 0])).sum()
    assert chi2_wrong > 16.3


def test_same_seed_same_tokens_and_eos_stops_a_row():
    _, graphdef, state = split()
    kw = dict(max_new_tokens=12, max_len=16, sampler=Sampler(1.0))
    a = generate(graphdef, state, [[1, 2, 3]], key=jax.random.key(5), **kw).tokens
    b = generate(graphdef, state, [[1, 2, 3]], key=jax.random.key(5), **kw).tokens
    c = generate(graphdef, state, [[1, 2, 3]], key=jax.random.key(6), **kw).tokens
    assert a == b and a != c
    row = a[0]
    eos = row[3]
    stopped = generate(graphdef, state, [[1, 2, 3], [4, 5]], key=jax.random.key(5), eos_id=eos, **kw).tokens
    assert stopped[0] == row[:row.index(eos) + 1]
    assert len(stopped[0]) < 12


def test_stop_sequence_ends_a_row():
    _, graphdef, state = split()
    kw = dict(max_new_tokens=12, max_len=16, sampler=Sampler(0.0))
    row = generate(graphdef, state, [[1, 2, 3]], **kw).tokens[0]
    stop = row[4:6]
    cut = generate(graphdef, state, [[1, 2, 3]], stop_sequences=[stop], **kw).tokens[0]
    first = next(i for i in range(len(row) - 1) if row[i:i + 2] == stop)
    assert cut == row[:first + 2]


def test_identical_prompts_in_one_batch_sample_differently():
    _, graphdef, state = split()
    out = generate(graphdef, state, [[1, 2, 3]] * 4, max_new_tokens=8, max_len=16, sampler=Sampler(1.0),
                   key=jax.random.key(0)).tokens
    assert len({tuple(row) for row in out}) == 4  # one random stream per row


def test_a_short_stop_sequence_is_found_beside_a_long_one():
    _, graphdef, state = split()
    kw = dict(max_new_tokens=12, max_len=16, sampler=Sampler(0.0))
    row = generate(graphdef, state, [[1, 2, 3]], **kw).tokens[0]
    long_stop = [22] * 20  # longer than the prompt and everything generated so far
    for first in (row[0], row[1]):
        cut = generate(graphdef, state, [[1, 2, 3]], stop_sequences=[[first], long_stop], **kw).tokens[0]
        assert cut == row[:row.index(first) + 1]


def test_ragged_batch_equals_separate_runs():
    _, graphdef, state = split(positions="rotary")
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 9, 8]]
    key = jax.random.key(11)
    kw = dict(max_new_tokens=8, max_len=16, sampler=Sampler(0.9, top_k=10), logprobs=True)
    batch = generate(graphdef, state, prompts, key=key, **kw)
    for i, p in enumerate(prompts):
        alone = generate(graphdef, state, [p], keys=[jax.random.fold_in(key, i)], **kw)  # row i's own stream
        assert alone.tokens[0] == batch.tokens[i]
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], rtol=1e-4, atol=1e-5)


def test_logprobs_are_the_models_log_softmax():
    model, graphdef, state = split()
    prompt = [2, 4, 6]
    out = generate(graphdef, state, [prompt], max_new_tokens=5, max_len=16, sampler=Sampler(1.0),
                   key=jax.random.key(2), logprobs=True)
    seq = prompt + out.tokens[0]
    lp = jax.nn.log_softmax(full_logits(model, seq))
    expected = [float(lp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(out.tokens[0])]
    np.testing.assert_allclose(out.logprobs[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_new, max_len", [(11, 16), (90, 128)])  # the second grows its cache: 80 -> 106 slots
def test_streaming_chunks_give_the_same_tokens_the_first_one_alone(max_new, max_len):
    _, graphdef, state = split(max_len=max_len)
    kw = dict(max_new_tokens=max_new, max_len=max_len, sampler=Sampler(1.0), key=jax.random.key(4))
    whole = generate(graphdef, state, [[1, 2], [3]], **kw).tokens
    seen, calls = [[], []], []

    def on_tokens(rows):
        calls.append([len(r) for r in rows])
        for s, r in zip(seen, rows):
            s.extend(r)

    streamed = generate(graphdef, state, [[1, 2], [3]], chunk=7, on_tokens=on_tokens, **kw).tokens
    assert streamed == whole == seen
    assert calls[0] == [1, 1]  # shown as soon as the prompt is read
    assert sum(c[0] for c in calls) == len(whole[0])


def test_streaming_keeps_no_params_alive():
    """The compiled-program cache of a stream holds programs, not the arguments they were compiled for."""
    import gc
    import weakref

    model, graphdef, state = split()
    leaf = weakref.ref(jax.tree.leaves(state)[0])
    generate(graphdef, state, [[1, 2]], max_new_tokens=3, max_len=CFG.max_len, sampler=Sampler(0.0), chunk=2,
             on_tokens=lambda rows: None)
    del model, state
    gc.collect()
    assert leaf() is None


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rotary"])
def test_sliding_window_beyond_the_context_matches_the_windows_full_forward(positions):
    model, graphdef, state = split(positions=positions)
    prompt = [1, 5, 2, 7, 3, 8, 4, 9, 5, 10]
    out = generate(graphdef, state, [prompt, prompt[:3]], max_new_tokens=20, max_len=16,
                   sampler=Sampler(0.0)).tokens
    forward = jax.jit(lambda seq_T: model(seq_T[None])[0])  # causal: padding after the window changes nothing
    for p, row in zip([prompt, prompt[:3]], out):
        assert len(row) == 20  # ran past the 16-token context
        seq = list(p)
        for tok in row:
            window = seq[-16:]
            assert tok == int(jnp.argmax(forward(jnp.asarray(window + [0] * (16 - len(window))))[len(window) - 1]))
            seq.append(tok)


def test_prompt_longer_than_the_context():
    _, graphdef, state = split()
    long = list(np.arange(40) % 23)
    out = generate(graphdef, state, [long], max_new_tokens=3, max_len=16, sampler=Sampler(0.0))
    assert len(out.tokens[0]) == 3
    with pytest.raises(ValueError, match="sliding window is off"):
        generate(graphdef, state, [long], max_new_tokens=3, max_len=16, window=False)


def test_sampler_rejects_bad_values():
    for kw in ({"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(ValueError):
            Sampler(**kw)


def test_masks_compose():
    pos = jnp.array([[0, 1, 2]])
    m = causal_mask(pos, pos) & padding_mask(jnp.array([[False, True, True]]))
    assert np.asarray(m)[0, 0].tolist() == [[False, False, False], [False, True, False], [False, True, True]]


def test_min_p_hand_computed_case():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: np.isfinite(np.asarray(min_p_filter(logits, p)))[0].tolist()  # noqa: E731
    assert kept(0.2) == [True, True, True, False]  # cut at 0.2 * 0.5 = 0.1
    assert kept(0.5) == [True, True, False, False]  # cut at 0.25
    assert kept(0.0) == [True] * 4


def test_repetition_penalty_hand_computed_case():
    logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
    seen = jnp.array([[True, True, False, False]])
    np.testing.assert_allclose(repetition_penalty_filter(logits, seen, 2.0), [[1.0, -2.0, 0.5, 3.0]])
    assert seen_tokens(jnp.array([[3, 0, 3]]), jnp.array([[True, False, True]]), 5).tolist() == [
        [False, False, False, True, False]]  # only valid tokens count


def test_greedy_with_repetition_penalty_equals_the_penalised_argmax_loop():
    model, graphdef, state = split()
    prompt, penalty = [3, 1, 4, 1, 5], 1.8
    out = generate(graphdef, state, [prompt], max_new_tokens=9, max_len=16,
                   sampler=Sampler(0.0, repetition_penalty=penalty)).tokens[0]
    plain = generate(graphdef, state, [prompt], max_new_tokens=9, max_len=16, sampler=Sampler(0.0)).tokens[0]
    forward = jax.jit(lambda seq_T: model(seq_T[None])[0])  # causal: padding after position t changes nothing
    seq = list(prompt)
    for _ in range(9):
        logits = np.asarray(forward(jnp.asarray(seq + [0] * (16 - len(seq))))[len(seq) - 1])
        seen = np.isin(np.arange(len(logits)), seq)
        logits = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
        seq.append(int(np.argmax(logits)))
    assert out == seq[len(prompt):] and out != plain


def test_the_decode_loop_compiles_its_dots_with_eigen_on_a_cpu():
    """The decode loop's dots of a few rows go to Eigen, not the default YNNPACK fusion (slower there: see
    `decode_loop_options`); the same loop compiled with the defaults does use YNNPACK, so the options take effect."""
    from transformer.infer import sampling

    _, graphdef, state = split(d_model=96, n_heads=3)
    init, run, _, _, _, args, _ = sampling._programs(graphdef, state, [[1, 2, 3]] * 16, max_new_tokens=4,
                                                     max_len=CFG.max_len, sampler=Sampler(0.0))
    s = init(*args)
    ours = run.trace(state, s, 4).lower().compile().as_text()
    default = jax.jit(run.__wrapped__).trace(state, s, 4).lower().compile().as_text()
    assert "ynn" in default
    assert "ynn" not in ours


@pytest.mark.parametrize("prompt_len", [8, 40])  # a prefill into the cache; a prompt past max_len (the window)
def test_the_prompt_is_unembedded_at_its_last_position_only(prompt_len):
    """A prompt's forward pass needs the next-token logits of its last position alone: the compiled first program
    holds no (batch, prompt, vocab) logits, only (batch, vocab) ones (for SmolLM2 at batch 16, unembedding every
    position of a 128-token prompt was a fifth of the prefill's work)."""
    from transformer.infer import sampling

    _, graphdef, state = split()
    B, V = 2, CFG.vocab_size
    init, _, _, _, _, args, P = sampling._programs(graphdef, state, [list(range(1, prompt_len + 1))] * B,
                                                   max_new_tokens=4, max_len=CFG.max_len, sampler=Sampler(0.0))
    hlo = init.lower(*args).as_text()
    assert f"{B}x{P}x{V}xf32" not in hlo and f"{B}x{CFG.max_len}x{V}xf32" not in hlo
    assert f"{B}x{V}xf32" in hlo
