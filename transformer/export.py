"""Export a decoder (a run directory trained or fine-tuned here, a Hugging Face directory, a GGUF file) as a Hugging
Face directory that transformers loads with the same logits:

    python -m transformer.export runs/default exported/
    python -m transformer.export runs/default exported/ --step 1000
    python -m transformer.export runs/sft_lora adapters/ --peft      # a LoRA run's adapters alone, for peft

The model's shape picks the family (GPT-2, or Llama / Mistral / Qwen2); the tokenizer goes along when it has a
Hugging Face form (imported tokenizers, char tokenizers as a one-token-per-character BPE, sentencepiece models
trained here as the same BPE or unigram model). Bad input is one line
on stderr and exit code 2, and nothing is written unless the whole export succeeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from transformer.cli import die, quiet_jax_logs


def hf_tokenizer(tok):
    """(the run's tokenizer in its Hugging Face form or None, why not): a sentencepiece model not trained here (its
    own normalisation) has no exact form."""
    from transformer.config import ConfigError
    from transformer.data.tokenizer import HFTokenizer

    if isinstance(tok, HFTokenizer):
        return tok, ""
    try:
        return tok.to_hf(), ""
    except ConfigError as e:
        return None, str(e)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other bad input
        die(f"{message} (see --help)")


def main(argv=None) -> int:
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory, Hugging Face model directory or .gguf file")
    ap.add_argument("out_dir", help="the directory to write (must not exist)")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--peft", action="store_true",
                    help="a LoRA run: write its adapters alone in the PEFT format (adapter_config.json + "
                         "adapter_model.safetensors) instead of the merged model")
    args = ap.parse_args(argv)
    quiet_jax_logs()
    import jax
    from flax import nnx

    from transformer.config import ConfigError
    from transformer.convert.hf import decoder_family, export_hf
    from transformer.convert.peft import export_peft
    from transformer.infer.loading import load_run
    from transformer.model.lora import LoRAParam, merged_params

    try:
        run = load_run(args.run, args.step)
        cfg = run.cfg.model
        if args.peft:
            n = export_peft(cfg, nnx.to_pure_dict(nnx.state(nnx.merge(run.graphdef, run.params), LoRAParam)),
                            args.out_dir, base=run.cfg.train.init_from)
            print(f"wrote {args.out_dir}: PEFT LoRA adapters of {n} matrices (rank {cfg.lora_rank}) for "
                  f"{run.cfg.train.init_from or 'the base model'}")
            return 0
        decoder_family(cfg)  # refuse before anything is read to the host
        if cfg.lora_rank:  # LoRA adapters folded into the weights they adapt: a plain model goes out
            params = merged_params(nnx.merge(run.graphdef, run.params))
            cfg = dataclasses.replace(cfg, lora_rank=0)
        else:
            params = nnx.to_pure_dict(run.params)
        tok, why = hf_tokenizer(run.tokenizer)
        kind = export_hf(cfg, params, tok, args.out_dir)
    except ConfigError as e:
        die(str(e))
    note = "" if tok is not None else f" (no tokenizer: {why})"
    print(f"wrote {args.out_dir}: a {kind} model, {sum(x.size for x in jax.tree.leaves(params)):,} parameters{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
