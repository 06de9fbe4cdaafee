"""Checkpoint retention: latest `keep` plus the best by val loss, over the whole run directory, whichever process
(finished, killed, or the current one) wrote the steps."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from transformer.checkpoint import CKPT_DIR, Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_state(step):
    return {"params": {"w": jnp.full(3, float(step))}, "step": jnp.asarray(step),
            "rng": jax.random.key_data(jax.random.key(step))}


def save_all(ckpt, saves):
    for step, val_loss in saves:
        ckpt.save(step, tiny_state(step), {}, val_loss)
    ckpt.wait()


def on_disk(run_dir):
    return sorted(os.listdir(os.path.join(run_dir, CKPT_DIR)))


def test_steps_without_val_loss_are_not_kept_forever(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2)
    save_all(ckpt, [(1, None), (2, None), (3, None), (4, 0.9)])  # e.g. saves between evaluations, or on SIGTERM
    assert ckpt.all_steps() == [3, 4]
    ckpt.close()
    assert on_disk(tmp_path) == ["3", "4"]


def test_restart_applies_the_policy_to_the_earlier_process_steps(tmp_path):
    first = Checkpointer(str(tmp_path), keep=2)
    save_all(first, [(1, 0.9), (2, 0.5), (3, 0.8), (4, None)])
    assert first.all_steps() == [2, 3, 4]
    # not closed, as after kill -9: a second process resumes in the same directory
    second = Checkpointer(str(tmp_path), keep=2)
    assert second.all_steps() == [2, 3, 4]
    save_all(second, [(5, 0.7), (6, None)])
    assert second.all_steps() == [2, 5, 6]  # latest 2, and step 2 is still the best
    second.close()
    first.close()
    assert on_disk(tmp_path) == ["2", "5", "6"]


@pytest.mark.parametrize("beaten", [False, True])
def test_best_from_before_the_restart_is_kept_until_beaten(tmp_path, beaten):
    first = Checkpointer(str(tmp_path), keep=2)
    save_all(first, [(1, 0.5), (2, 0.9), (3, 0.8)])
    first.close()
    second = Checkpointer(str(tmp_path), keep=2)
    save_all(second, [(4, 0.4 if beaten else 0.7), (5, 0.6), (6, 0.65)])
    want = [4, 5, 6] if beaten else [1, 5, 6]
    assert second.all_steps() == want
    assert second.manager.best_step() == want[0]
    if not beaten:
        assert second.restore_meta(1) == {}  # still a whole checkpoint
    second.close()
    assert on_disk(tmp_path) == [str(s) for s in want]


def test_killed_process_steps_and_its_unfinished_save_are_cleaned_up(tmp_path):
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        from tests.test_checkpoint import Checkpointer, save_all
        ckpt = Checkpointer({str(tmp_path)!r}, keep=2)
        save_all(ckpt, [(1, 0.5), (2, 0.9), (3, 0.8)])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert on_disk(tmp_path) == ["1", "2", "3"]
    # what a kill in the middle of writing step 9 leaves: a temporary directory no step listing shows
    partial = tmp_path / CKPT_DIR / "9.orbax-checkpoint-tmp" / "params"
    partial.mkdir(parents=True)
    (partial / "chunk").write_bytes(b"\0" * 1024)
    second = Checkpointer(str(tmp_path), keep=2)
    save_all(second, [(4, 0.7), (5, 0.6)])
    second.close()
    assert on_disk(tmp_path) == ["1", "4", "5"]

