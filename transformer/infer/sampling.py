"""Token sampling and generation with an explicit KV cache.

Filters are pure `logits_BV -> logits_BV` functions, applied in the usual order: the repetition penalty (on the raw
logits), then temperature, top-k, top-p and min-p.
`generate()` left-pads a batch of prompts so that every row ends at the same cache slot, runs one batched prefill,
then a `lax.while_loop` of single-token decode steps until `max_new_tokens` or until every row has finished (EOS or a
stop sequence). When a row would outgrow the model's context, generation continues on a sliding window: each step then
runs the full forward over the last `max_len` tokens (positions re-based to 0), which is exact for learned,
sinusoidal and rotary positions alike.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer import sharding
from transformer.model.attention import causal_mask, padding_mask

FILTERED = -jnp.inf  # a filtered token gets probability exactly 0
NOT_GENERATED = -2  # fills the window of recent tokens before generation: matches no token and no stop padding


def temperature_filter(logits_BV, temperature: float):
    return logits_BV / temperature


def top_k_filter(logits_BV, k: int):
    """Keep the k largest logits (ties with the k-th value are kept too); k <= 0 or k >= V keeps all."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
    return jnp.where(logits_BV < kth_B1, FILTERED, logits_BV)


# float32 sums of probabilities are off by a few ulps: a top set whose mass is p up to rounding has reached p.
TOP_P_TOLERANCE = 1e-6


def top_p_filter(logits_BV, p: float):
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (at least one token; ties
    with the last kept token are kept). A set whose mass equals p up to float32 rounding has reached it: the next
    tokens are not kept. p >= 1 keeps all."""
    if p >= 1.0:
        return logits_BV
    sorted_BV = jnp.sort(logits_BV, axis=-1)[..., ::-1]
    probs_BV = jax.nn.softmax(sorted_BV.astype(jnp.float32), axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    n_keep_B1 = jnp.maximum(jnp.sum(mass_before_BV < p - TOP_P_TOLERANCE, axis=-1, keepdims=True), 1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
    return jnp.where(logits_BV < threshold_B1, FILTERED, logits_BV)


def min_p_filter(logits_BV, p: float):
    """Keep the tokens whose probability is at least p times the most likely token's (min-p sampling); p <= 0 keeps
    all. Scale-free: the cut follows the model's confidence, tight when one token dominates, loose when many tie."""
    if p <= 0.0:
        return logits_BV
    # p(token) >= p * p(best)  <=>  logit >= best logit + log p  (the softmax normaliser cancels)
    threshold_B1 = jnp.max(logits_BV, axis=-1, keepdims=True) + jnp.log(p)
    return jnp.where(logits_BV < threshold_B1, FILTERED, logits_BV)


def repetition_penalty_filter(logits_BV, seen_BV, penalty: float):
    """Make every token already in the context (`seen_BV`) less likely: a positive logit divided by `penalty`, a
    negative one multiplied by it (the CTRL paper's rule, as transformers applies it); 1 changes nothing."""
    if penalty == 1.0:
        return logits_BV
    penalised = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalised, logits_BV)


def seen_tokens(tokens_BL, valid_BL, vocab: int):
    """(B, V) booleans: which ids occur among each row's valid tokens."""
    B = tokens_BL.shape[0]
    rows_BL = jnp.broadcast_to(jnp.arange(B)[:, None], tokens_BL.shape)
    return jnp.zeros((B, vocab), bool).at[rows_BL, jnp.clip(tokens_BL, 0, vocab - 1)].max(valid_BL)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0 means greedy (argmax); top_k 0, top_p 1, min_p 0 and repetition_penalty 1 switch those filters
    off. The repetition penalty applies to greedy decoding too."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def filter(self, logits_BV, seen_BV=None):
        if seen_BV is not None:
            logits_BV = repetition_penalty_filter(logits_BV, seen_BV, self.repetition_penalty)
        logits_BV = temperature_filter(logits_BV, self.temperature)
        logits_BV = top_p_filter(top_k_filter(logits_BV, self.top_k), self.top_p)
        return min_p_filter(logits_BV, self.min_p)

    def __call__(self, logits_BV, keys_B, seen_BV=None):
        """One token per row; row b draws with its own key, so a row's draw does not depend on the batch.
        `seen_BV`: the tokens of each row's context, for the repetition penalty."""
        if self.greedy:
            if seen_BV is not None:
                logits_BV = repetition_penalty_filter(logits_BV, seen_BV, self.repetition_penalty)
            return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        filtered_BV = self.filter(logits_BV.astype(jnp.float32), seen_BV)
        return jax.vmap(jax.random.categorical)(keys_B, filtered_BV).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row, cut after EOS / a stop sequence
    logprobs: list[list[float]] | None  # log p(token) under the model (temperature 1, unfiltered)


# ---------------------------------------------------------------------------------------------------------- decode

def _positions(valid_BS):
    """Position of each real token counted from the row's first real token; pads get 0 (they are masked anyway)."""
    return jnp.maximum(jnp.cumsum(valid_BS, axis=1) - 1, 0).astype(jnp.int32)


def _last_position(tokens_BT):
    """(B, 1) indices of each row's last slot: a prompt's forward pass unembeds there only (every row ends there)."""
    B, T = tokens_BT.shape
    return jnp.full((B, 1), T - 1, jnp.int32)


def _prefill(graphdef, params, tokens_BP, valid_BP, cache_len: int):
    model = nnx.merge(graphdef, params)
    B, P = tokens_BP.shape
    cache = model.init_cache(B, cache_len)
    slots_S = jnp.arange(cache_len)
    valid_BS = jnp.zeros((B, cache_len), bool).at[:, :P].set(valid_BP)
    # Slots, not positions: a row's real tokens sit in consecutive slots, so slot distances are position distances.
    mask = causal_mask(jnp.arange(P)[None], slots_S[None], model.cfg.sliding_window) & padding_mask(valid_BS)
    logits_B1V, cache = model(tokens_BP, positions_BT=_positions(valid_BP), mask_B1TS=mask, cache=cache,
                              cache_index=0, logits_at_BN=_last_position(tokens_BP))
    return logits_B1V[:, 0], cache


def _window_logits(graphdef, params, tokens_BL, valid_BL, end, max_len: int):
    """Full forward over the last max_len slots before `end` (every row ends there): the sliding window."""
    model = nnx.merge(graphdef, params)
    start = end - max_len
    win_BT = jax.lax.dynamic_slice_in_dim(tokens_BL, start, max_len, axis=1)
    valid_BT = jax.lax.dynamic_slice_in_dim(valid_BL, start, max_len, axis=1)
    pos_BT = _positions(valid_BT)
    mask = causal_mask(pos_BT, pos_BT, model.cfg.sliding_window) & padding_mask(valid_BT)
    return model(win_BT, positions_BT=pos_BT, mask_B1TS=mask, logits_at_BN=_last_position(win_BT))[:, 0]


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, sampler: Sampler, *, max_len: int, prompt_len: int, max_new: int, eos_id: int, pad_id: int,
              use_window: bool, with_logprobs: bool, mesh=None):
    P, N = prompt_len, max_new
    # The cache grows in phases (P + 64, 128, 192, 256, 384, 512, 768, ... slots): a decode step reads every slot of
    # the cache it is given, so a cache sized for the current length, not the final one, cuts the memory traffic
    # that dominates decoding by about half, for a handful of compiled loop bodies.
    full_len = P + min(N, max_len)
    sizes = [P + 64 * i for i in (1, 2, 3)] + [P + 2 ** i * m // 2 for i in range(8, 40) for m in (2, 3)]
    phases = sorted({min(size, full_len) for size in sizes if size - 64 < full_len})

    def init(params, tokens_BP, valid_BP, keys_B, stops_KM):
        B = tokens_BP.shape[0]
        if P > max_len:  # only reachable with a window: the prompt itself needs one
            last_BV = _window_logits(graphdef, params, tokens_BP, valid_BP, P, max_len)
            cache = nnx.merge(graphdef, params).init_cache(B, phases[0])
        else:
            last_BV, cache = _prefill(graphdef, params, tokens_BP, valid_BP, phases[0])
        tokens_BL = jnp.full((B, P + N), pad_id, jnp.int32).at[:, :P].set(tokens_BP)
        valid_BL = jnp.zeros((B, P + N), bool).at[:, :P].set(valid_BP)
        s = {"tokens": tokens_BL, "valid": valid_BL, "cache": cache, "logits": last_BV.astype(jnp.float32),
             "lengths": valid_BP.sum(1).astype(jnp.int32), "done": jnp.zeros((B,), bool),
             "step": jnp.zeros((), jnp.int32), "keys": keys_B, "stops": stops_KM,
             "tail": jnp.full((B, stops_KM.shape[1]), NOT_GENERATED, jnp.int32),
             "logprobs": jnp.zeros((B, N), jnp.float32)}
        # The first new token needs only the prompt's forward pass: a stream shows it before the decode loop is
        # compiled. The loop's first step draws the same token again (same logits, same key).
        return dict(s, first=choose(s))

    def choose(s):
        """The next token of each row (pad for finished rows), drawn with the row's key folded with the step."""
        t = s["step"]
        keys_B = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), t))(s["keys"])
        seen_BV = None
        if sampler.repetition_penalty != 1.0:
            seen_BV = seen_tokens(s["tokens"], s["valid"], s["logits"].shape[-1])
        return jnp.where(s["done"], pad_id, sampler(s["logits"], keys_B, seen_BV))

    def stop_hit(tail_BM, stops_KM):
        """Do the last M generated tokens of each row (`tail_BM`, NOT_GENERATED before the first ones) end with one
        of the stop sequences (right-aligned, padded with -1 on the left)? Only generated tokens count: a stop never
        straddles the prompt, and a short stop is found however long the longest one is."""
        if stops_KM.shape[0] == 0:
            return jnp.zeros((tail_BM.shape[0],), bool)
        match_BKM = (tail_BM[:, None, :] == stops_KM[None]) | (stops_KM[None] < 0)
        return jnp.any(jnp.all(match_BKM, axis=-1), axis=-1)

    def step(params, s):
        t = s["step"]
        slot = P + t
        token_B = choose(s)
        tokens_BL = s["tokens"].at[:, slot].set(token_B)
        valid_BL = s["valid"].at[:, slot].set(~s["done"])
        out = dict(s, tokens=tokens_BL, valid=valid_BL, step=t + 1)
        if with_logprobs:
            lp_B = jnp.take_along_axis(jax.nn.log_softmax(s["logits"]), token_B[:, None], axis=1)[:, 0]
            out["logprobs"] = s["logprobs"].at[:, t].set(jnp.where(s["done"], 0.0, lp_B))
        if s["tail"].shape[1]:  # no stop sequences: no window to keep
            out["tail"] = jnp.concatenate([s["tail"][:, 1:], token_B[:, None]], axis=1)
        finished_B = (token_B == eos_id) | stop_hit(out["tail"], s["stops"]) | (t + 1 >= N)
        out["done"] = s["done"] | finished_B
        lengths_B = s["lengths"] + 1  # the sequence the next forward conditions on
        out["lengths"] = lengths_B

        def cached(_):
            model = nnx.merge(graphdef, params)
            S = s["cache"][0]["v"].shape[2]
            valid_BS = valid_BL[:, :S]
            mask = causal_mask(slot[None, None], jnp.arange(S)[None], model.cfg.sliding_window) & padding_mask(valid_BS)
            logits_B1V, cache = model(token_B[:, None], positions_BT=(lengths_B - 1)[:, None], mask_B1TS=mask,
                                      cache=s["cache"], cache_index=slot)
            return logits_B1V[:, 0], cache

        def windowed(_):
            return _window_logits(graphdef, params, tokens_BL, valid_BL, slot + 1, max_len), s["cache"]

        if use_window:
            logits_BV, cache = jax.lax.cond(jnp.max(lengths_B) > max_len, windowed, cached, None)
        else:
            logits_BV, cache = cached(None)
        out["logits"], out["cache"] = logits_BV.astype(jnp.float32), cache
        return out

    def run(params, s, until):
        """Decode until step `until`, all rows done, or the cache is full (then `grow` it)."""
        S = s["cache"][0]["v"].shape[2]

        def more(s):
            room = P + s["step"] < S  # the next token's keys fit in this cache
            if use_window:  # once the window slides, the cache is no longer used
                room = room | (jnp.max(s["lengths"]) + 1 > max_len)
            return (s["step"] < until) & ~jnp.all(s["done"]) & room

        return jax.lax.while_loop(more, lambda s: step(params, s), s)

    def grow(s, S):
        def pad(layer):  # k is B N H S, v is B N S H
            k, v = layer["k"], layer["v"]
            return {"k": jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, S - k.shape[3]))),
                    "v": jnp.pad(v, ((0, 0), (0, 0), (0, S - v.shape[2]), (0, 0)))}
        return dict(s, cache=[pad(layer) for layer in s["cache"]])

    def init_and_run(params, tokens_BP, valid_BP, keys_B, stops_KM):
        s = init(params, tokens_BP, valid_BP, keys_B, stops_KM)
        for S in phases:
            s = run(params, grow(s, S), N)
        return s

    if mesh is not None:  # sharded params: keep rows over data and heads over tensor through the loop
        init, run, grow, init_and_run = (sharding.activation_mesh(mesh)(f) for f in (init, run, grow, init_and_run))
    options = decode_loop_options()
    return (jax.jit(init), jax.jit(run, compiler_options=options), jax.jit(grow, static_argnums=1), phases,
            jax.jit(init_and_run, compiler_options=options))


def decode_loop_options() -> dict | None:
    """XLA options of the programs that run the decode loop. On a CPU its dots have a row per sequence, and XLA:CPU's
    default library for dots of a few rows (YNNPACK fusions) runs them slower than Eigen: SmolLM2's decode-shaped
    MLP matmuls at batch 16 took 45.4 ms a step against 32.8 ms with Eigen (`benchmarks/cpu_matmul_libraries.py`;
    batch 1 uses Eigen either way). A stream's prefill program (`init`, which the first token waits for) keeps the
    default; the one-program `init_and_run` of a non-streamed generate prefills under these options too."""
    if jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


def precompile(graphdef, abstract_params, prompts: Sequence[Sequence[int]], **kw) -> None:
    """Compile the programs that `generate(graphdef, params, prompts, chunk=..., **kw)` (streaming) starts with, from
    the params' shapes and shardings alone (e.g. `LoadedRun.abstract_params`): a caller compiles while the weights
    are still loading, and the first token then waits for whichever of the two ends last."""
    init, run, _, _, _, args, _ = _programs(graphdef, abstract_params, prompts, **kw)
    _first_programs(init, run, args)


def _programs(graphdef, params, prompts, *, max_new_tokens: int, max_len: int, sampler: Sampler = Sampler(),
              key=None, keys=None, eos_id: int | None = None, pad_id: int = 0,
              stop_sequences: Sequence[Sequence[int]] = (), window: bool = True, logprobs: bool = False):
    """generate's compiled programs for these arguments and the arguments they take; P is the padded prompt length."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    if not window and longest + max_new_tokens > max_len:
        raise ValueError(f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceed the context of {max_len} "
                         "and the sliding window is off")
    # Round the padded prompt length up so that nearby lengths share one compiled program.
    P = min(-(-longest // 16) * 16, max(longest, max_len))
    tokens = np.full((B, P), pad_id, np.int32)
    valid = np.zeros((B, P), bool)
    for b, p in enumerate(prompts):
        p = list(p)[-P:]
        tokens[b, P - len(p):], valid[b, P - len(p):] = p, True
    if keys is None:  # row b draws from fold_in(key, b): identical prompts in one batch give different samples
        key = jax.random.key(0) if key is None else key
        keys = [jax.random.fold_in(key, b) for b in range(B)]
    keys_B = jnp.stack([jax.random.key_data(k) for k in keys])
    M = max((len(s) for s in stop_sequences), default=0)
    stops = np.full((len(stop_sequences), M), -1, np.int32)
    for i, s in enumerate(stop_sequences):
        stops[i, M - len(s):] = s
    use_window = window and longest + max_new_tokens > max_len
    mesh = sharding.mesh_of(params)
    mesh = mesh if mesh is not None and mesh.size > 1 else None
    init, run, grow, phases, init_and_run = _compiled(
        graphdef, sampler, max_len=max_len, prompt_len=P, max_new=max_new_tokens,
        eos_id=-1 if eos_id is None else eos_id, pad_id=pad_id, use_window=use_window, with_logprobs=logprobs,
        mesh=mesh)
    rows = (lambda a: jax.device_put(a, sharding.rows_sharding(mesh, a.shape))) if mesh else jnp.asarray
    args = (params, rows(tokens), rows(valid), rows(keys_B), jnp.asarray(stops))
    return init, run, grow, phases, init_and_run, args, P


def generate(graphdef, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, max_len: int,
             sampler: Sampler = Sampler(), key=None, keys=None, eos_id: int | None = None, pad_id: int = 0,
             stop_sequences: Sequence[Sequence[int]] = (), window: bool = True, logprobs: bool = False,
             chunk: int | None = None, on_tokens: Callable[[list[list[int]]], None] | None = None) -> Generation:
    """Generate up to `max_new_tokens` after each prompt.

    `key` seeds sampling, row b drawing from `fold_in(key, b)` (or give one key per row in `keys`): each row has its
    own random stream, so identical prompts in one batch give different samples, and row b's tokens do not depend on
    the other rows. With `chunk`, the decode loop returns to Python every `chunk` tokens and `on_tokens` gets
    the new tokens of every row (streaming), the first token alone as soon as the prompt is read; without it,
    prefill and decoding are one compiled call.
    """
    init, run, grow, phases, init_and_run, args, P = _programs(
        graphdef, params, prompts, max_new_tokens=max_new_tokens, max_len=max_len, sampler=sampler, key=key, keys=keys,
        eos_id=eos_id, pad_id=pad_id, stop_sequences=stop_sequences, window=window, logprobs=logprobs)
    if chunk is None:
        state = init_and_run(*args)
    else:
        init_now, run_first = _first_programs(init, run, args)
        state = init_now(*args)
        shown = 0  # tokens of each row given to on_tokens
        if on_tokens is not None:  # the first token, as soon as the prompt is read
            on_tokens(np.asarray(state["first"])[:, None].tolist())
            shown = 1
        run_first.start()  # the decode loop compiles while the first token is shown
        step = 0
        while True:
            S = state["cache"][0]["v"].shape[2]
            if P + step >= S and S < phases[-1]:  # this phase's cache is full: move to the next size
                S = next(p for p in phases if p > S)
                state = grow(state, S)
            state = (run_first.result() if S == phases[0] else run)(params, state, min(step + chunk, max_new_tokens))
            step = int(state["step"])
            if on_tokens is not None and step > shown:
                new = np.asarray(state["tokens"][:, P + shown:P + step])
                real = np.asarray(state["valid"][:, P + shown:P + step])  # drops the pads of finished rows
                on_tokens([row[keep].tolist() for row, keep in zip(new, real)])
                shown = step
            if step >= max_new_tokens or bool(jnp.all(state["done"])):
                break
    return _collect(state, P, logprobs)


def _first_programs(init, run, args):
    """The prefill compiled now, and the first phase's decode loop to compile on a background thread once started
    (XLA compiles without holding the GIL). A stream starts it after the first token: that token waits for the
    prefill alone (SmolLM2 on 2 cores, no compilation cache: 1.4 s, against 3.5 s for the loop), and the two
    compilations do not share the cores with the weights loading or the prompt's forward pass. Later phases compile
    through `run` as usual. Kept per argument signature, as jit keeps its own programs."""
    leaves, treedef = jax.tree.flatten(args)
    key = (init, run, treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
    if key not in _FIRST_PROGRAMS:
        traced = init.trace(*args)
        init_compiled = traced.lower().compile()
        if len(_FIRST_PROGRAMS) >= 64:
            _FIRST_PROGRAMS.pop(next(iter(_FIRST_PROGRAMS)))
        _FIRST_PROGRAMS[key] = init_compiled, _Later(lambda: run.trace(args[0], traced.out_info, 0).lower().compile())
    return _FIRST_PROGRAMS[key]


class _Later:
    """A computation run once on the background thread: `start()` submits it, `result()` starts it if need be and
    waits. Once submitted, the computation is let go of: what it closes over (the arguments, params included) is not
    kept alive by the cache of compiled programs."""

    def __init__(self, fn):
        self.fn, self.future = fn, None

    def start(self) -> _Later:
        if self.future is None:
            self.future, self.fn = _COMPILER.submit(self.fn), None
        return self

    def result(self):
        return self.start().future.result()


_COMPILER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-decode-loop")
_FIRST_PROGRAMS: dict = {}


def _collect(state, P, with_logprobs) -> Generation:
    """Each row's tokens up to where it finished: the decode loop marks a slot valid until the row's EOS or stop
    sequence, so the count of valid generated slots is the row's length."""
    step = int(state["step"])
    tokens = np.asarray(state["tokens"])[:, P:P + step]
    lengths = np.asarray(state["valid"])[:, P:P + step].sum(axis=1)
    lps = np.asarray(state["logprobs"]) if with_logprobs else None
    return Generation([row[:n].tolist() for row, n in zip(tokens, lengths)],
                      [lps[b, :n].tolist() for b, n in enumerate(lengths)] if with_logprobs else None)
