"""sample.py end to end on a tiny trained run, and its bad inputs: one line, exit code 2."""
import os
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": FAST_COMPILE}


def run_process(script, *args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
                          env=ENV, input=stdin, timeout=300)


def run(script, *args, stdin=None):
    from inproc import run as run_here  # the same, in this process (tests/inproc.py)
    return run_here(script, *args, stdin=stdin)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    corpus = tmp / "c.txt"
    corpus.write_text("abcabcabd\n" * 300)
    run_dir = tmp / "run"
    out = run("train.py", "--data.path", str(corpus), "--train.run_dir", str(run_dir), "--model.d_model=16",
              "--model.n_heads=2", "--model.n_layers=1", "--model.max_len=12", "--train.batch_size=8",
              "--train.steps=30", "--optim.lr=1e-2", "--optim.warmup_steps=2", "--train.progress=false",
              "--train.sample_tokens=20")
    assert out.returncode == 0, out.stderr
    assert "--- sample (20 tokens" in out.stdout  # train.py ends with a sample
    return str(run_dir)


def test_sample_generates_from_the_run_dir_alone(trained):
    out = run("sample.py", "--checkpoint", trained, "--prompt", "ab", "--max-new-tokens", "30", "--greedy",
              "--num-samples", "2")
    assert out.returncode == 0, out.stderr
    samples = out.stdout.split("\n---\n")
    assert len(samples) == 2 and samples[0] == samples[1]  # greedy: identical
    assert samples[0].startswith("ab") and len(samples[0].strip()) > 20
    assert set(samples[0].strip()) <= set("abcd\n")
    piped = run("sample.py", "--checkpoint", trained, "--max-new-tokens", "5", "--seed", "3", stdin="abc")
    assert piped.returncode == 0 and piped.stdout.startswith("abc")
    long = run("sample.py", "--checkpoint", trained, "--prompt", "abc" * 10, "--max-new-tokens", "20")
    assert long.returncode == 0, long.stderr  # prompt + generation past the 12-token context: sliding window


@pytest.mark.parametrize("args, fragment", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--prompt", "xyz"], "never saw"),
    (["--prompt", "abc" * 10, "--no-window"], "exceed"),
    (["--step", "999"], "no checkpoint for step 999"),
    (["--bogus"], "unrecognized"),
    (["--source", "abc"], "--source does not apply"),  # a decoder run: options of other architectures are refused
    (["--beam", "2"], "--beam does not apply"),
    (["--fill-mask", "a [MASK]"], "holds a decoder"),
])
def test_bad_inputs_are_one_line_errors(trained, args, fragment):
    out = run("sample.py", "--checkpoint", trained, "--max-new-tokens", "5", *args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert fragment in lines[0]


def test_missing_and_half_written_run_dirs(tmp_path):
    out = run_process("sample.py", "--checkpoint", str(tmp_path / "nope"))  # a fresh interpreter: no log lines either
    assert out.returncode == 2 and "nope not found: give a run directory" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "empty").mkdir()
    out = run("sample.py", "--checkpoint", str(tmp_path / "empty"))
    assert out.returncode == 2 and "is not a run directory" in out.stderr and "Traceback" not in out.stderr
    half = tmp_path / "half"
    (half / "checkpoints" / "100.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a save that never finished
    out = run("sample.py", "--checkpoint", str(half))
    assert out.returncode == 2 and "no finished checkpoint" in out.stderr and "Traceback" not in out.stderr
