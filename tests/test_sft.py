"""Supervised fine-tuning of chat models (tasks/sft.py): which tokens the loss counts, the batches, the data checks,
and train.py -> sample.py --chat end to end on a tiny Llama directory."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.config import ConfigError, DataConfig
from transformer.data.sources import load_conversations
from transformer.data.tokenizer import HFTokenizer
from transformer.tasks.sft import SFTPipeline, SupervisedFineTuning, conversation_tokens

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat"},
                {"role": "assistant", "content": "sat on"}, {"role": "user", "content": "the mat"},
                {"role": "assistant", "content": "and slept"}]


@pytest.fixture(scope="module")
def ref():
    return np.load(os.path.join(FIXTURES, "tiny_decoders_reference.npz"))


@pytest.fixture(scope="module")
def tok(ref):
    return HFTokenizer(str(ref["tokenizer"]), eos="<|im_end|>", chat_template=CHATML)


def test_only_the_assistant_replies_and_their_end_of_turn_are_learned(tok):
    ids, learn = conversation_tokens(tok, CONVERSATION)
    whole = tok.encode(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
        "sat on<|im_end|>\n<|im_start|>user\nthe mat<|im_end|>\n<|im_start|>assistant\nand slept<|im_end|>\n",
        add_special_tokens=False).tolist()
    assert ids.tolist() == whole  # segment by segment = the conversation tokenized whole
    learned = tok.decode(ids[learn], skip_special_tokens=False)
    assert learned == "sat on<|im_end|>\nand slept<|im_end|>\n"
    assert "<|im_start|>" not in learned and "the cat" not in learned


@pytest.fixture(scope="module")
def model(ref):
    import tempfile

    from test_decoders import model_of, write_tiny

    from transformer.convert.hf import load_hf
    with tempfile.TemporaryDirectory() as d:
        return model_of(load_hf(write_tiny(os.path.join(d, "llama"), ref, "llama")))


def pipeline(tok, convs, rows, pack=0):
    return SFTPipeline(convs, convs[:1], T=128, batch_rows=rows, eval_rows=1, n_eval=1, seed=0, tok=tok, pad=0,
                       pack=pack > 0, pack_length=pack)


def test_the_loss_counts_assistant_targets_only(model, tok):
    """The task's loss is the cross-entropy of the assistant's tokens (and their end of turn) alone: computed from
    the logits at every position, masked by hand with the tokens `conversation_tokens` marks as learned."""
    from transformer.tasks.losses import token_losses
    pipe = pipeline(tok, [CONVERSATION] * 2, 2)
    batch = {k: jnp.asarray(v) for k, v in pipe.next(0, lambda n: np.arange(n)).items()}
    sums = nnx.jit(lambda m, b: SupervisedFineTuning().sums(m, b, None)["loss"])  # compiled once, not op by op
    loss = lambda b: float(sums(model, b))  # noqa: E731
    ids, learn = conversation_tokens(tok, CONVERSATION)
    every = np.asarray(token_losses(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids[None, :-1])),
                                    jnp.asarray(ids[None, 1:])))[0]
    np.testing.assert_allclose(loss(batch), 2 * every[learn[1:]].sum(), rtol=1e-5)
    user = np.flatnonzero(~learn[1:])[3]  # one user-turn target more would move it
    assert abs(2 * (every[learn[1:]].sum() + every[user]) - loss(batch)) > 1e-3
    w = np.asarray(batch["weights"])
    asst, pad = tuple(np.argwhere(w == 1)[0]), tuple(np.argwhere(w == 0)[0])
    moved_asst = dict(batch, targets=batch["targets"].at[asst].set((batch["targets"][asst] + 7) % 300))
    moved_pad = dict(batch, targets=batch["targets"].at[pad].set((batch["targets"][pad] + 7) % 300))
    assert loss(moved_asst) != loss(batch)  # an assistant token's target counts
    assert loss(moved_pad) == loss(batch)  # the padding of the gather does not


@nnx.jit
def sft_logits(model, batch):
    return SupervisedFineTuning().logits(model, batch, None)


def segment_losses(model, batch) -> list[float]:
    """Each conversation's summed loss, row by row, segment by segment."""
    from transformer.tasks.losses import token_losses
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    ce = np.asarray(token_losses(sft_logits(model, b), b["targets"])) * batch["weights"]
    seg = np.take_along_axis(batch["segments"], batch["loss_at"], axis=1)
    return [ce[r][(seg[r] == s) & (batch["weights"][r] > 0)].sum()
            for r in range(len(ce)) for s in range(1, batch["segments"][r].max() + 1)]


SHORT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]
OTHER = [{"role": "user", "content": "the mat"}, {"role": "assistant", "content": "and slept on it"}]


def test_padded_rows_give_each_conversation_its_own_loss(model, tok):
    """A short conversation batched with a long one (padded on the right) has the loss it has alone."""
    pipe = pipeline(tok, [SHORT, CONVERSATION], 2)
    together = segment_losses(model, pipe._batch([[e] for e in pipe.train], 2))  # one batch, though 2 buckets
    alone = [segment_losses(model, pipeline(tok, [c], 1).next(0, np.arange))[0] for c in (SHORT, CONVERSATION)]
    np.testing.assert_allclose(sorted(together), sorted(alone), rtol=1e-5)


def test_packed_rows_give_each_conversation_its_own_loss(model, tok):
    """Three conversations packed into one row (segment ids, positions restarting) have the losses they have
    alone: none attends to another, and each reads its own positions from 0."""
    convs = [SHORT, CONVERSATION, OTHER]
    batch = pipeline(tok, convs, 1, pack=128).next(0, np.arange)
    assert batch["inputs"].shape == (1, 128) and batch["segments"].max() == 3  # all three in one row
    packed = segment_losses(model, batch)
    alone = [segment_losses(model, pipeline(tok, [c], 1).next(0, np.arange))[0] for c in convs]
    np.testing.assert_allclose(sorted(packed), sorted(alone), rtol=1e-5)
    mixed = dict(batch, segments=np.minimum(batch["segments"], 1))  # one segment: they would see each other
    assert not np.allclose(sorted(segment_losses(model, mixed)), sorted(alone), rtol=1e-3)


def test_packing_places_every_conversation_once_per_epoch():
    from transformer.data.blocks import packed_plan
    lengths = np.random.default_rng(0).integers(5, 60, 500)
    plans = [packed_plan(3, e, lengths, 128, 4) for e in (0, 1)]
    for plan in plans:
        rows = [row for batch in plan for row in batch]
        assert sorted(i for row in rows for i in row) == list(range(500))
        assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
        assert sum(lengths) / (128 * len(rows)) > 0.9  # little padding
    assert plans[0] != plans[1] and packed_plan(3, 0, lengths, 128, 4) == plans[0]
    # a cap on the targets a row holds (the width of its gathered targets) is kept too
    targets = lengths // 3
    capped = [row for batch in packed_plan(3, 0, lengths, 128, 4, targets=targets, target_capacity=30)
              for row in batch]
    assert sorted(i for row in capped for i in row) == list(range(500))
    assert max(sum(targets[i] for i in row) for row in capped) <= 30
    assert max(sum(targets[i] for i in row) for row in rows) > 30  # without the cap, rows held more


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}], "unknown role"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
    ([{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}], "not text"),
    ([{"text": "hello"}], "neither a 'messages' column"),
])
def test_bad_chat_data_is_refused_naming_the_row(tmp_path, rows, message):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=message):
        load_conversations(DataConfig(path=str(path)))


def test_prompt_completion_rows_are_one_exchange(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "2 plus 2?", "completion": "4"}) + "\n")
    train, val = load_conversations(DataConfig(path=str(path)))
    assert train == [[{"role": "user", "content": "2 plus 2?"}, {"role": "assistant", "content": "4"}]]
    assert val is None


def test_a_model_without_a_chat_template_is_refused(ref, tmp_path):
    from transformer.config import Config
    cfg = Config().validate()
    with pytest.raises(ConfigError, match="chat template"):
        SupervisedFineTuning().prepare(cfg, str(tmp_path), HFTokenizer(str(ref["tokenizer"])))
    with pytest.raises(ConfigError, match="train.init_from"):
        SupervisedFineTuning().prepare(cfg, str(tmp_path), None)


def test_train_sft_then_chat_with_the_result(ref, tmp_path):
    from inproc import run
    from test_decoders import write_tiny

    model = write_tiny(tmp_path / "llama", ref, "llama")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "the cat"},
                                                     {"role": "assistant", "content": "sat on the mat"}]}) + "\n"
                            for _ in range(20)))
    out = run("train.py", "--train.task=sft", "--train.init_from", model, "--data.path", str(data),
              "--train.run_dir", str(tmp_path / "run"), "--train.steps=40", "--train.batch_size=4",
              "--optim.lr=1e-2", "--optim.warmup_steps=2", "--train.progress=false", "--train.eval_interval=40",
              "--train.sample_tokens=0", "--train.bleu_sentences=2")
    assert out.returncode == 0, out.stderr
    bleu = float(out.stdout.split("BLEU ")[-1].split()[0])  # greedy replies to the held-out conversations
    assert bleu > 50, out.stdout
    chat = run("sample.py", "--checkpoint", str(tmp_path / "run"), "--chat", "--greedy", "--max-new-tokens", "8",
               stdin="the cat\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip().startswith("sat on the mat")  # it learnt the reply, and to stop after it
    bad = run("train.py", "--train.task=sft", "--train.init_from", model, "--data.path", str(tmp_path / "x.jsonl"),
              "--train.run_dir", str(tmp_path / "run2"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
