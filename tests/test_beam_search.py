import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformer.infer.beam_search import beam_search

PAD, BOS, EOS, A, B, C, D = range(7)


def _table_logits(rows: dict, V: int = 7):
    """Next-token logits from hand-written probabilities {prev: {next: p}}; the rest of a row is ~0."""
    table = np.full((V, V), 1e-9)
    table[[EOS, PAD], EOS] = 1.0
    for prev, nxt in rows.items():
        table[prev, list(nxt)] = list(nxt.values())
    return jnp.log(jnp.asarray(table / table.sum(1, keepdims=True), jnp.float32))


def _search(logits_VV, *, beam, max_new, length_penalty, batch=1):
    """First-order table: the next token depends on the previous one only."""
    def step(prev_R, t, state):
        return logits_VV[prev_R], state

    run = jax.jit(lambda state: beam_search(step, state, batch=batch, beam=beam, max_new=max_new, bos=BOS, eos=EOS,
                                            pad=PAD, length_penalty=length_penalty))
    tokens_BKN, scores_BK = run(jnp.zeros((batch * beam, 1)))
    return np.asarray(tokens_BKN), np.asarray(scores_BK)


def _penalty(length, alpha):
    return ((5 + length) / 6) ** alpha


def test_beam_search_finds_the_sequence_greedy_misses():
    """Hand-built next-token table: greedy takes 'a' (0.6) then EOS (0.4) = 0.24; 'b' (0.4) then EOS (0.9) = 0.36."""
    table = np.full((5, 5), 1e-9)
    table[BOS, [A, B]] = [0.6, 0.4]
    table[A, [A, B, EOS]] = [0.3, 0.3, 0.4]
    table[B, [A, EOS]] = [0.1, 0.9]
    table[[EOS, PAD], EOS] = 1.0
    logits = jnp.log(jnp.asarray(table / table.sum(1, keepdims=True)))

    def step(prev_R, t, state):
        return logits[prev_R], state

    def run(beam):
        tokens, scores = beam_search(step, jnp.zeros((2 * beam, 1)), batch=2, beam=beam, max_new=4, bos=BOS,
                                     eos=EOS, pad=PAD, length_penalty=0.0)
        return np.asarray(tokens[:, 0]), np.asarray(scores[:, 0])

    greedy, g_score = run(1)
    best, b_score = run(2)
    assert greedy[0].tolist() == [A, EOS, PAD, PAD] and best[0].tolist() == [B, EOS, PAD, PAD]
    np.testing.assert_allclose(np.exp([g_score[0], b_score[0]]), [0.24, 0.36], rtol=1e-4)


def test_a_finished_hypothesis_does_not_take_a_live_slot():
    """Beam 2: [EOS] (0.37) and [a] (0.32) lead after one token, [b] (0.31) is third. [b c d EOS] (0.31, 4 tokens) is
    the best under the length penalty, but a search whose finished [EOS] keeps one of the two slots prunes [b]."""
    logits = _table_logits({BOS: {EOS: 0.37, A: 0.32, B: 0.31}, A: {EOS: 1.0}, B: {C: 1.0}, C: {D: 1.0},
                            D: {EOS: 1.0}})
    tokens, scores = _search(logits, beam=2, max_new=6, length_penalty=0.6)
    assert tokens[0, 0].tolist() == [B, C, D, EOS, PAD, PAD]
    assert tokens[0, 1].tolist() == [EOS, PAD, PAD, PAD, PAD, PAD]
    np.testing.assert_allclose(scores[0], [np.log(0.31) / _penalty(4, 0.6), np.log(0.37)], rtol=1e-4)


def test_the_alive_set_stays_full_when_both_beams_would_rather_end():
    """After [a] and [b], EOS is each beam's likeliest next token, so the top four candidates are [a EOS] 0.3,
    [b EOS] 0.275, [b d] 0.225, [a c] 0.2: two finish and two must go on. [a c e f g EOS] (0.2, 6 tokens) then wins
    with length_penalty 1 (-0.878 against -1.032 for [a EOS]); drawing fewer than 2K candidates loses it."""
    E, F, G = 7, 8, 9
    logits = _table_logits({BOS: {A: 0.5, B: 0.5}, A: {EOS: 0.6, C: 0.4}, B: {EOS: 0.55, D: 0.45}, D: {EOS: 1.0},
                            C: {E: 1.0}, E: {F: 1.0}, F: {G: 1.0}, G: {EOS: 1.0}}, V=10)
    tokens, scores = _search(logits, beam=2, max_new=8, length_penalty=1.0)
    assert tokens[0, :, :6].tolist() == [[A, C, E, F, G, EOS], [A, EOS, PAD, PAD, PAD, PAD]]
    np.testing.assert_allclose(scores[0], [np.log(0.2) / _penalty(6, 1.0), np.log(0.3) / _penalty(2, 1.0)], rtol=1e-4)


def test_the_length_penalty_decides_what_survives_the_search():
    """Beam 1 returns one hypothesis, so only the search itself can make the penalty matter: [EOS] (0.4) wins on raw
    log p, [a b EOS] (0.35) with length_penalty 0.6 (log 0.35 / (8/6)**0.6 = -0.883 > log 0.4 = -0.916)."""
    logits = _table_logits({BOS: {EOS: 0.4, A: 0.35, B: 0.25}, A: {B: 1.0}, B: {EOS: 1.0}})
    raw, raw_score = _search(logits, beam=1, max_new=4, length_penalty=0.0)
    long, long_score = _search(logits, beam=1, max_new=4, length_penalty=0.6)
    assert raw[0, 0].tolist() == [EOS, PAD, PAD, PAD] and long[0, 0].tolist() == [A, B, EOS, PAD]
    np.testing.assert_allclose([raw_score[0, 0], long_score[0, 0]], [np.log(0.4), np.log(0.35) / _penalty(3, 0.6)],
                               rtol=1e-4)


def test_pad_and_bos_are_never_emitted():
    """PAD and BOS are the likeliest next tokens everywhere; the hypotheses must route around them."""
    logits = _table_logits({BOS: {PAD: 0.5, BOS: 0.3, A: 0.15, EOS: 0.05},
                            A: {PAD: 0.5, BOS: 0.2, A: 0.1, EOS: 0.2}})
    tokens, scores = _search(logits, beam=2, max_new=4, length_penalty=0.6)
    assert tokens[0].tolist() == [[EOS, PAD, PAD, PAD], [A, EOS, PAD, PAD]]
    np.testing.assert_allclose(scores[0], [np.log(0.05), np.log(0.15 * 0.2) / _penalty(2, 0.6)], rtol=1e-4)


@functools.lru_cache(maxsize=None)
def _second_order_search(alpha, *, batch=3, beam=3, max_new=6, V=11):
    """Random next-token logits that depend on the last two tokens, different for each item. The step reads the
    token before last from `state`, so a state row that does not follow its beam changes the logits."""
    table_BVVV = jax.random.normal(jax.random.key(0), (batch, V, V, V)) * 2.0
    item_R = jnp.arange(batch * beam) // beam

    def step(prev_R, t, before_R):
        return table_BVVV[item_R, before_R, prev_R], prev_R

    run = jax.jit(lambda state: beam_search(step, state, batch=batch, beam=beam, max_new=max_new, bos=BOS, eos=EOS,
                                            pad=PAD, length_penalty=alpha))
    tokens_BKN, scores_BK = run(jnp.full((batch * beam,), BOS))
    return np.asarray(jax.nn.log_softmax(table_BVVV, -1)), np.asarray(tokens_BKN), np.asarray(scores_BK)


def test_scores_are_penalised_log_probs_of_the_tokens_and_the_state_follows_its_beam():
    for alpha in (0.0, 0.6):
        logp_BVVV, tokens_BKN, scores_BK = _second_order_search(alpha)
        lengths = set()
        for b, k in np.ndindex(scores_BK.shape):
            row = tokens_BKN[b, k].tolist()
            n = row.index(EOS) + 1 if EOS in row else len(row)
            assert all(tok == PAD for tok in row[n:])
            lengths.add(n)
            before, prev, logp = BOS, BOS, 0.0
            for tok in row[:n]:
                logp += logp_BVVV[b, before, prev, tok]
                before, prev = prev, tok
            np.testing.assert_allclose(scores_BK[b, k], logp / _penalty(n, alpha), rtol=1e-5, err_msg=(alpha, b, k))
        assert len(lengths) > 1  # hypotheses of different lengths met


def test_hypotheses_are_distinct_and_sorted_best_first():
    _, tokens_BKN, scores_BK = _second_order_search(0.6)
    assert np.all(np.isfinite(scores_BK)) and np.all(np.diff(scores_BK, axis=1) <= 0)
    for rows in tokens_BKN.tolist():
        assert len({tuple(r) for r in rows}) == len(rows)


def test_beam_one_equals_greedy():
    """Random tables where EOS is unlikely except after one token, which it then follows with near certainty: no
    early EOS can outscore the greedy path, so beam 1 must return it, finished or cut at max_new."""
    V, N, Z = 11, 8, 7
    table_BVV = np.asarray(jax.random.normal(jax.random.key(1), (4, V, V))) * 2.0
    table_BVV[..., [PAD, BOS, EOS]] = -30.0
    table_BVV[:, Z, EOS] = 30.0
    logp_BVV = np.asarray(jax.nn.log_softmax(jnp.asarray(table_BVV), -1))
    greedy, greedy_logp = [], []
    for b in range(4):
        row, logp = [], 0.0
        while len(row) < N and EOS not in row:
            tok = int(np.argmax(table_BVV[b, row[-1] if row else BOS]))
            logp += logp_BVV[b, row[-1] if row else BOS, tok]
            row.append(tok)
        greedy.append(row + [PAD] * (N - len(row)))
        greedy_logp.append(logp)
    assert any(EOS in g for g in greedy) and not all(EOS in g for g in greedy)  # both endings are exercised

    item_R = jnp.arange(4)

    def step(prev_R, t, state):
        return jnp.asarray(table_BVV)[item_R, prev_R], state

    tokens, scores = jax.jit(lambda state: beam_search(step, state, batch=4, beam=1, max_new=N, bos=BOS, eos=EOS,
                                                       pad=PAD, length_penalty=0.0))(jnp.zeros((4, 1)))
    assert np.asarray(tokens[:, 0]).tolist() == greedy
    np.testing.assert_allclose(scores[:, 0], greedy_logp, rtol=1e-5)


def test_slots_no_hypothesis_can_fill_are_pad_with_score_minus_inf():
    """Vocabulary {PAD, BOS, EOS, a} and 2 tokens allow only [EOS], [a EOS] and [a a]: a fourth beam stays empty."""
    logits = _table_logits({BOS: {EOS: 0.5, A: 0.5}, A: {EOS: 0.25, A: 0.75}}, V=4)
    tokens, scores = _search(logits, beam=4, max_new=2, length_penalty=0.6)
    assert not np.any(np.isnan(scores))
    assert tokens[0].tolist() == [[EOS, PAD], [A, A], [A, EOS], [PAD, PAD]]
    want = [np.log(0.5), np.log(0.375) / _penalty(2, 0.6), np.log(0.125) / _penalty(2, 0.6), -np.inf]
    np.testing.assert_allclose(scores[0], want, rtol=1e-4)
