"""Bad input is a one-line error with exit code 2: no traceback, nothing already written lost."""
import os
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE

from transformer.cli import parse_args
from transformer.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE}  # one CPU device, like a user's laptop
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def run_here(*args):
    from inproc import run  # train.py in this process (tests/inproc.py)
    return run("train.py", *args)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for f in fragments:
        assert f in lines[0], lines[0]


def test_overrides_are_typed():
    cfg, flags = parse_args(["--config", "shakespeare_char", "--model.d_model=256", "--train.steps", "7",
                             "--model.tie_embeddings=false", "--optim.lr=3e-4", "--resume"], flags=("resume",))
    assert cfg.model.d_model == 256 and cfg.train.steps == 7 and cfg.model.tie_embeddings is False
    assert cfg.optim.lr == 3e-4 and cfg.preset == "shakespeare_char" and flags == {"resume": True}


@pytest.mark.parametrize("argv, fragment", [
    (["--model.d_model=130"], "not divisible by model.n_heads"),
    (["--optim.lr=-0.1"], "optim.lr"),
    (["--mesh.cpu_devices=-2"], "mesh.cpu_devices"),
    (["--model.nope=1"], "unknown option --model.nope"),
    (["--bogus.x=1"], "unknown config section"),
    (["--model.d_model=abc"], "not a valid int"),
    (["--model.positions=alibi"], "must be one of"),
    (["--config", "no_such_preset"], "unknown preset"),
    (["stray"], "unexpected argument"),
])
def test_bad_values_are_config_errors(argv, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_args(argv)


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    assert_one_line_error(run_train("--model.d_model=130", "--model.n_heads=4"), "d_model=130")
    assert_one_line_error(run_here("--optim.lr=-1"), "optim.lr")  # the rest in this process
    assert_one_line_error(run_here("--model.foo=1"), "unknown option")
    assert_one_line_error(run_here("--data.path", str(tmp_path / "missing.txt"),
                                   "--train.run_dir", str(tmp_path / "r")), "not found")
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus " * 10)
    assert_one_line_error(run_here("--data.path", str(small), "--train.run_dir", str(tmp_path / "r2")),
                          "T=64", "max_len")


def test_existing_run_dir_with_another_model_is_refused_and_kept(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    run = tmp_path / "run"
    common = ["--data.path", str(corpus), "--train.run_dir", str(run), "--model.d_model=16", "--model.n_heads=2",
              "--model.n_layers=1", "--model.max_len=8", "--train.batch_size=8", "--train.steps=2",
              "--train.progress=false"]
    ok = run_train(*common, "--mesh.cpu_devices=2")  # the host split into two devices, one half-batch each
    assert ok.returncode == 0, ok.stderr
    assert "2 cpu device(s) mesh {'data': 2" in ok.stdout, ok.stdout
    before = {p: os.path.getmtime(os.path.join(run, p)) for p in os.listdir(run)}
    ckpts = sorted(os.listdir(run / "checkpoints"))
    bad = run_here(*common, "--model.d_model=32")
    assert_one_line_error(bad, "holds a different model", "d_model")
    assert {p: os.path.getmtime(os.path.join(run, p)) for p in os.listdir(run)} == before
    assert sorted(os.listdir(run / "checkpoints")) == ckpts
    # already at step 2: resumes and stops at once; how a machine multiplies (model.matmul_dtype, "auto" by
    # default and resolved per machine) changes no parameter, so it may differ
    again = run_here(*common, "--resume", "--model.matmul_dtype=bfloat16")
    assert again.returncode == 0, again.stderr


def test_every_preset_validates_and_builds():
    import dataclasses
    import glob

    from flax import nnx

    from transformer.model import build_model
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
    assert {"shakespeare_char", "gpt2_small", "bert_mlm_tiny", "classify_tiny", "multi30k_de_en",
            "transformer_base"} <= set(names)
    for name in names:
        cfg, _ = parse_args(["--config", name])
        model_cfg = dataclasses.replace(cfg.model, vocab_size=1000, n_classes=2 if cfg.train.task == "classify" else 0)
        model = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))  # noqa: B023
        assert type(model).__name__ == {"decoder": "DecoderLM", "encoder": "EncoderLM",
                                        "encoder_decoder": "EncoderDecoder"}[cfg.model.arch], name
