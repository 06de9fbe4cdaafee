"""Outside formats: Hugging Face directories (convert/hf.py, with one name-mapping table per family: bert.py,
llama.py, gpt2.py) and GGUF files (convert/gguf.py), imported wherever a run directory is accepted, and decoders
exported back to Hugging Face (export_hf in convert/hf.py; the command: python -m transformer.export)."""
from __future__ import annotations

import os

from transformer.convert.gguf import is_gguf, open_gguf
from transformer.convert.hf import is_hf_dir, open_hf
from transformer.convert.mapping import Pretrained


def is_pretrained(path: str) -> bool:
    """A Hugging Face model directory or a GGUF file (rather than a run directory of ours)."""
    return is_gguf(path) or (os.path.isdir(path) and is_hf_dir(path))


def open_pretrained(path: str) -> Pretrained:
    """Config and tokenizer now; the weights when `.params` is first read."""
    return open_gguf(path) if is_gguf(path) else open_hf(path)


__all__ = ["Pretrained", "is_pretrained", "open_pretrained"]
