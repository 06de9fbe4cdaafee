"""Supervised fine-tuning of chat models (tasks/sft.py): which tokens the loss counts, the batches, the data checks,
and train.py -> sample.py --chat end to end on a tiny Llama directory."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

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


def test_the_loss_counts_assistant_targets_only(ref, tok):
    import tempfile

    from test_decoders import model_of, write_tiny

    from transformer.convert.hf import load_hf
    pipe = SFTPipeline([CONVERSATION] * 2, [CONVERSATION], T=64, batch_rows=2, eval_rows=1, n_eval=1, seed=0,
                       tok=tok, pad=0)
    batch = {k: jnp.asarray(v) for k, v in pipe.next(0, lambda n: np.arange(n)).items()}
    task = SupervisedFineTuning()
    with tempfile.TemporaryDirectory() as d:
        model = model_of(load_hf(write_tiny(os.path.join(d, "llama"), ref, "llama")))
    loss = lambda b: float(task.sums(model, b, None)["loss"])  # noqa: E731
    base = loss(batch)
    w = np.asarray(batch["weights"])
    user_t = tuple(np.argwhere((w == 0) & np.asarray(batch["valid"]))[3])
    asst_t = tuple(np.argwhere(w == 1)[0])
    moved_user = dict(batch, targets=batch["targets"].at[user_t].set((batch["targets"][user_t] + 7) % 300))
    moved_asst = dict(batch, targets=batch["targets"].at[asst_t].set((batch["targets"][asst_t] + 7) % 300))
    assert loss(moved_user) == base  # a user token's target does not count
    assert loss(moved_asst) != base  # an assistant token's does


def test_padded_rows_give_each_conversation_its_own_loss(ref, tok):
    """A short conversation batched with a long one (padded on the right) has the loss it has alone."""
    import tempfile

    from test_decoders import model_of, write_tiny

    from transformer.convert.hf import load_hf
    from transformer.tasks.losses import token_losses
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]
    with tempfile.TemporaryDirectory() as d:
        model = model_of(load_hf(write_tiny(os.path.join(d, "llama"), ref, "llama")))

    def per_row(convs):
        pipe = SFTPipeline(convs, convs[:1], T=64, batch_rows=len(convs), eval_rows=1, n_eval=1, seed=0, tok=tok,
                           pad=0)
        b = pipe._batch(pipe.train, len(convs))
        ce = token_losses(model(jnp.asarray(b["inputs"])), jnp.asarray(b["targets"]))
        return (np.asarray(ce) * b["weights"]).sum(1) / b["weights"].sum(1)

    together = per_row([short, CONVERSATION])
    np.testing.assert_allclose(together[0], per_row([short])[0], rtol=1e-5)
    np.testing.assert_allclose(together[1], per_row([CONVERSATION])[0], rtol=1e-5)


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
    from test_decoders import cli as run
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
