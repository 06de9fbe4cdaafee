"""sacreBLEU of an encoder-decoder (translation) run.

    python -m transformer.infer.evaluate --checkpoint RUN --source-file val.de --reference-file val.en [--beam 4]

Hypotheses are detokenized text (the tokenizer's decode) scored cased against the raw references with sacreBLEU's
default 13a tokenization, the standard comparable figure. train.py reports the same score on the validation pairs at
every evaluation of a translation run.
"""
from __future__ import annotations

import argparse
import sys
import time

BATCH = 128  # sentences per decoding call: a few compiled shapes, steady memory


def translate_texts(graphdef, params, tok, max_len: int, texts: list[str], *, beam: int = 4,
                    length_penalty: float = 0.6, sampler=None, key=None,
                    max_new_tokens: int | None = None) -> list[str]:
    """Detokenized translations of `texts`, in order (beam search, or `sampler` with beam 1; greedy by default).
    Sources are cut to `max_len` tokens; targets stop at `max_new_tokens` (default `max_len`)."""
    from transformer.data.specials import translation_ids
    from transformer.infer.sampling import Sampler
    from transformer.infer.translate import translate
    from transformer.sharding import one_cpu_device

    bos, eos, pad, _ = translation_ids(tok)
    params = one_cpu_device(params)
    # Sorted by length so each batch pads little; results go back in the input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    hyps = [""] * len(texts)
    for start in range(0, len(order), BATCH):
        idx = order[start:start + BATCH]
        ids = [tok.encode(texts[i]).tolist()[:max_len] or [eos] for i in idx]
        if len(order) > BATCH:  # a short last batch repeats its first source: the same compiled program
            ids += [ids[0]] * (BATCH - len(ids))
        for i, row in zip(idx, translate(graphdef, params, ids, max_new_tokens=max_new_tokens or max_len, bos=bos,
                                         eos=eos, pad=pad, beam_size=beam, length_penalty=length_penalty,
                                         sampler=sampler or Sampler(0.0), key=key)):
            hyps[i] = tok.decode(row)
    return hyps


def bleu(hypotheses: list[str], references: list[str]):
    import sacrebleu

    return sacrebleu.corpus_bleu(hypotheses, [references])


def main(argv=None) -> int:
    from transformer.cli import die, quiet_jax_logs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--step", type=int)
    ap.add_argument("--source-file", required=True)
    ap.add_argument("--reference-file", required=True)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--length-penalty", type=float, default=0.6)
    ap.add_argument("--output", help="also write the hypotheses to this file")
    args = ap.parse_args(argv)
    quiet_jax_logs()
    from transformer.config import ConfigError
    from transformer.infer.loading import load_run

    try:
        if args.beam < 1:
            raise ConfigError(f"--beam={args.beam} must be >= 1")
        texts = []
        for path in (args.source_file, args.reference_file):
            try:
                with open(path, encoding="utf-8") as f:
                    texts.append(f.read().splitlines())
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read {path}: {e}") from None
        sources, references = texts
        if len(sources) != len(references):
            raise ConfigError(f"{args.source_file} has {len(sources)} lines but {args.reference_file} has "
                              f"{len(references)}: they must be aligned")
        run = load_run(args.checkpoint, args.step)
        if run.cfg.model.arch != "encoder_decoder":
            raise ConfigError(f"{args.checkpoint} holds a {run.cfg.model.arch} model, not an encoder-decoder")
    except ConfigError as e:
        die(str(e))
    t0 = time.perf_counter()
    hyps = translate_texts(run.graphdef, run.params, run.tokenizer, run.cfg.model.max_len, sources, beam=args.beam,
                           length_penalty=args.length_penalty)
    seconds = time.perf_counter() - t0
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("\n".join(hyps) + "\n")
    score = bleu(hyps, references)
    print(f"BLEU {score.score:.2f} on {len(sources)} sentences (beam {args.beam}, {seconds:.1f} s to translate; "
          f"sacreBLEU {score.format(signature=False)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
