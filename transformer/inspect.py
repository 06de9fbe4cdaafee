"""Look inside a model: any run of the three families, a Hugging Face directory or a GGUF file.

    python -m transformer.inspect next "The capital of France is" --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf
    python -m transformer.inspect next "The capital of France is [MASK]." --checkpoint path/to/all-MiniLM-L6-v2
    python -m transformer.inspect attention "The cat sat on the mat." --checkpoint MODEL --layer 3 --png attn.png
    python -m transformer.inspect attention "Ein Mann fährt Fahrrad." --checkpoint runs/multi30k_de_en --png x.png
    python -m transformer.inspect lens "The Eiffel Tower is in the city of" --checkpoint MODEL --png lens.png
    python -m transformer.inspect neighbours tower --checkpoint MODEL
    python -m transformer.inspect analogy king man woman --checkpoint MODEL
    python -m transformer.inspect tokens "Spaces belong to tokens 🙂" --checkpoint MODEL

next: the most probable next tokens (an encoder: the fillers of each [MASK]; an encoder-decoder: the next target
token after --target). attention: one head's attention probabilities (--head), or all heads of a layer, as text and
as a heatmap with --png; for an encoder-decoder, --part cross (target over source, the default), self or encoder.
lens: the logit lens, every layer's residual stream read out through the final norm and the output layer.
neighbours / analogy: nearest tokens by cosine over the embedding table (analogy: A - B + C). tokens: the pieces
and ids of a text, spaces and partial UTF-8 bytes made visible. Figures need matplotlib (pip install matplotlib).
Bad input is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from transformer.cli import die, quiet_jax_logs

ROW = "{:>4}  {:<24} {:>8}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other bad input
        die(f"{message} (see --help)")


def parse(argv):
    ap = _Parser(prog="python -m transformer.inspect", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, help, *positional):
        p = sub.add_parser(name, help=help)
        for arg, arg_help in positional:
            p.add_argument(arg, help=arg_help)
        p.add_argument("--checkpoint", required=True, help="run directory, Hugging Face directory or .gguf file")
        p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
        return p

    text = ("text", "the input text")
    p = command("next", "the most probable next tokens", text)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--png", help="also draw them as a bar chart in this PNG file")
    p.add_argument("--target", default="", help="encoder-decoder: the target so far (default: none)")
    p = command("attention", "attention probabilities of a layer (all heads) or one head", text)
    p.add_argument("--layer", type=int, default=-1, help="layer (0 = first; negative counts from the last)")
    p.add_argument("--head", type=int, help="one head (default: all heads of the layer)")
    p.add_argument("--part", choices=("cross", "self", "encoder"), default="cross",
                   help="encoder-decoder: target over source (cross), the decoder's self-attention, the encoder's")
    p.add_argument("--target", help="encoder-decoder: the target text (default: the model's greedy translation)")
    p.add_argument("--png", help="draw the heatmap(s) in this PNG file")
    p = command("lens", "the logit lens: each layer's top next token at each position", text)
    p.add_argument("--target", help="encoder-decoder: the target text (default: the model's greedy translation)")
    p.add_argument("--png", help="draw the lens in this PNG file")
    p = command("neighbours", "nearest tokens to a word in the embedding table", ("word", "a word that is one token"))
    p.add_argument("--top", type=int, default=10)
    p = command("analogy", "A - B + C: nearest tokens (king man woman -> queen?)", ("a", "A"), ("b", "B"), ("c", "C"))
    p.add_argument("--top", type=int, default=10)
    command("tokens", "the pieces and ids of a text", text)
    args = ap.parse_args(argv)
    if getattr(args, "top", 1) < 1:
        die(f"--top={args.top} must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------------- inputs

class View:
    """The token ids a command looks at, with their pieces: for an encoder-decoder, target ids over source ids."""

    def __init__(self, run, text: str, target: str | None = None):
        from transformer.data.specials import specials_for, translation_ids
        from transformer.infer.encode import encode_text

        if not text.strip():
            die("the text is empty: give at least one non-space character")
        tok, arch = run.tokenizer, run.cfg.model.arch
        self.run, self.src = run, None
        if arch == "encoder":
            self.specials, _ = specials_for(tok)
            self.ids = encode_text(tok, text, self.specials, run.cfg.model.max_len).tolist()
        elif arch == "encoder_decoder":
            bos, eos, pad, _ = translation_ids(tok)
            self.names = {bos: "<s>", eos: "</s>", pad: "<pad>"}
            self.src = tok.encode(text).tolist()[:run.cfg.model.max_len]
            if target is None:
                from transformer.infer.evaluate import translate_texts
                target = translate_texts(run.graphdef, run.params, tok, run.cfg.model.max_len, [text], beam=1)[0]
            self.ids = [bos] + tok.encode(target).tolist()[:run.cfg.model.max_len - 1]
        else:
            self.ids = run.tokenizer.encode(text).tolist()
            if not self.ids:
                die(f"{text!r} encodes to no tokens")
            if len(self.ids) > run.cfg.model.max_len:
                die(f"the text is {len(self.ids)} tokens; this model reads at most {run.cfg.model.max_len}")

    def piece(self, i: int) -> str:
        tok = self.run.tokenizer
        if i < tok.vocab_size:
            return tok.piece(i)
        if hasattr(self, "specials"):  # ids appended after the vocabulary
            return {self.specials.cls: "[CLS]", self.specials.sep: "[SEP]", self.specials.mask: "[MASK]",
                    self.specials.pad: "[PAD]"}[i]
        return self.names.get(i, f"<{i}>")

    def pieces(self, ids=None) -> list[str]:
        return [self.piece(i) for i in (self.ids if ids is None else ids)]

    def internals(self):
        from transformer.infer.internals import internals

        return internals(self.run.graphdef, self.run.params, self.ids, src_S=self.src)


def one_token(run, word: str) -> int:
    """The id of a word that is one token: as it reads inside a sentence (after a space) when the vocabulary has
    that form, else as written."""
    if not word.strip():
        die("the word is empty")
    tok = run.tokenizer
    kwargs = {"add_special_tokens": False} if hasattr(tok, "tokenizer_config") else {}
    specials = {getattr(tok, f"{k}_id", None) for k in ("bos", "eos", "cls", "sep", "pad")} - {None}
    tries = []
    for form in (" " + word, word):
        try:
            ids = [i for i in tok.encode(form, **kwargs).tolist() if i not in specials]
        except Exception:  # e.g. a character a char tokenizer never saw
            continue
        if len(ids) == 1:
            return ids[0]
        tries.append(ids)
    if not tries:
        die(f"{word!r} cannot be encoded by this model's tokenizer")
    pieces = " ".join(repr(tok.piece(i)) for i in tries[-1])
    die(f"{word!r} is not one token in this vocabulary: it splits into {pieces}; pick a word that is one token")


def _layer_head(args, L: int, N: int) -> tuple[int, int | None]:
    if not -L <= args.layer < L:
        die(f"--layer={args.layer} is out of range: this model has {L} layers (0..{L - 1}, or -1 for the last)")
    if args.head is not None and not 0 <= args.head < N:
        die(f"--head={args.head} is out of range: this model has {N} heads (0..{N - 1})")
    return args.layer % L, args.head


def _plt():
    try:
        import matplotlib
    except ImportError:
        die("figures need matplotlib: pip install matplotlib (or pip install -e '.[plot]')")
    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    warnings.filterwarnings("ignore", message="Glyph .* missing")  # emoji and scripts the default font lacks
    return plt


def _save(fig, path: str) -> None:
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as e:
        die(f"cannot write {path}: {e.strerror or e}")
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------- commands

def cmd_next(args, run) -> None:
    from transformer.infer.internals import next_token_probs, top

    if run.cfg.model.arch == "encoder":
        return _fill_mask(args, run)
    view = View(run, args.text, args.target)
    probs = next_token_probs(view.internals().logits_TV[-1])
    best = top(probs, args.top)
    print(f"after {''.join(view.pieces())!r}:")
    print(ROW.format("rank", "token", "prob"))
    for r, (i, p) in enumerate(best, 1):
        print(ROW.format(r, view.piece(i), f"{p:.4f}"), f" (id {i})")
    if args.png:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(best) + 1))
        ax.barh([view.piece(i) for i, _ in best][::-1], [p for _, p in best][::-1])
        ax.set_xlabel("probability")
        ax.set_title(f"next token after {args.text!r}"[:80])
        _save(fig, args.png)


def _fill_mask(args, run) -> None:
    from transformer.config import ConfigError
    from transformer.infer.encode import MASK_TEXT, fill_mask
    from transformer.infer.internals import cosine_neighbours, embedding_table

    if MASK_TEXT not in args.text:
        die(f"an encoder predicts masked tokens: put {MASK_TEXT} in the text")
    from flax import nnx

    head = nnx.to_pure_dict(run.params)["mlm"]
    if np.all(np.asarray(head["b_V"]) == 0) and np.all(np.asarray(head["norm"]["scale_D"]) == 1):
        # A sentence-embedding checkpoint (all-MiniLM-L6-v2) ships no masked-LM head: the importer gives it a fresh
        # one. Its output states still live in the (tied) embedding space, so their nearest tokens are shown.
        view = View(run, args.text)
        final_TD = view.internals().residual_LTD[-1]
        table = embedding_table(run.params)
        print("this checkpoint has no trained masked-LM head (a sentence-embedding model): showing the tokens "
              "nearest each [MASK]'s output state by cosine over the embedding table (scores are cosines)")
        fillers = [cosine_neighbours(table, final_TD[t], args.top, exclude=(i,))
                   for t, i in enumerate(view.ids) if view.piece(i) == MASK_TEXT]
        fillers = [[(view.piece(i), c) for i, c in row] for row in fillers]
    else:
        try:
            fillers = fill_mask(run, args.text, args.top)
        except ConfigError as e:
            die(str(e))
    for k, row in enumerate(fillers, 1):
        print(f"[MASK] {k}:")
        print(ROW.format("rank", "token", "score"))
        for r, (piece, p) in enumerate(row, 1):
            print(ROW.format(r, piece, f"{p:.4f}"))
    if args.png:
        plt = _plt()
        fig, axes = plt.subplots(len(fillers), 1, figsize=(6, (0.35 * args.top + 1) * len(fillers)), squeeze=False)
        for k, (ax, row) in enumerate(zip(axes[:, 0], fillers), 1):
            ax.barh([p for p, _ in row][::-1], [s for _, s in row][::-1])
            ax.set_title(f"[MASK] {k}")
        _save(fig, args.png)


def _attention_summary(probs_NTS, causal: bool) -> list[str]:
    """Where each head looks, averaged over queries: the first key, the previous key, itself, and its favourite."""
    N, T, S = probs_NTS.shape
    lines = []
    for n in range(N):
        p = probs_NTS[n]
        line = f"head {n:2d}: first {p[:, 0].mean():.2f}"
        if causal and T == S and T > 1:
            line += f", previous {np.mean([p[t, t - 1] for t in range(1, T)]):.2f}"
            line += f", itself {np.mean(np.diag(p)):.2f}"
        lines.append(line)
    return lines


def cmd_attention(args, run) -> None:
    view = View(run, args.text, args.target)
    seen = view.internals()
    keys, queries = view.pieces(), view.pieces()
    probs_LNTS, what = seen.attention_LNTS, "self-attention"
    if run.cfg.model.arch == "encoder_decoder":
        if args.part == "cross":
            probs_LNTS, keys, what = seen.cross_LNTS, view.pieces(view.src), "cross-attention (target over source)"
        elif args.part == "encoder":
            probs_LNTS, what = seen.encoder_LNSS, "encoder self-attention"
            keys = queries = view.pieces(view.src)
    elif args.part != "cross":
        die("--part is for encoder-decoder models")
    L, N = probs_LNTS.shape[:2]
    layer, head = _layer_head(args, L, N)
    if view.src is not None:
        print(f"source: {' '.join(view.pieces(view.src))}\ntarget: {' '.join(view.pieces())}")
    probs_NTS = probs_LNTS[layer]
    causal = run.cfg.model.arch != "encoder" and what != "encoder self-attention" and "cross" not in what
    print(f"layer {layer} {what}, {len(queries)} queries x {len(keys)} keys; mean probability on the")
    for n, line in enumerate(_attention_summary(probs_NTS, causal)):
        if head is None or n == head:
            print(line)
    if not args.png:
        print("add --png FILE for the heatmap")
        return
    plt = _plt()
    heads = range(N) if head is None else [head]
    cols = 1 if head is not None else int(np.ceil(np.sqrt(N)))
    rows = int(np.ceil(len(heads) / cols))
    size = max(3.0, 0.28 * max(len(keys), len(queries)))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, n in zip(axes.ravel(), heads):
        ax.axis("on")
        ax.imshow(probs_NTS[n], cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=7)
        ax.set_yticks(range(len(queries)), queries, fontsize=7)
        ax.set_title(f"layer {layer} head {n}", fontsize=9)
    fig.suptitle(what)
    _save(fig, args.png)


def cmd_lens(args, run) -> None:
    from transformer.infer.internals import logit_lens

    view = View(run, args.text, args.target)
    seen = view.internals()
    probs_LTK, ids_LTK = logit_lens(run.graphdef, run.params, seen.residual_LTD, k=1)
    pieces = view.pieces()
    L = probs_LTK.shape[0]
    width = 14
    cell = lambda s: (s if len(s) <= width else s[:width - 1] + "…").ljust(width)  # noqa: E731
    print("logit lens: the top next token (and its probability) read from the residual stream entering each layer;")
    print(f"the last row is the model's output. Columns: the input tokens.\n{'':>9}" + "".join(cell(p) for p in pieces))
    for layer in range(L):
        name = "embed" if layer == 0 else ("output" if layer == L - 1 else f"layer {layer}")
        row = "".join(cell(f"{view.piece(int(ids_LTK[layer, t, 0]))} {probs_LTK[layer, t, 0]:.2f}")
                      for t in range(len(pieces)))
        print(f"{name:>8} {row}")
    if args.png:
        plt = _plt()
        T = len(pieces)
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * T), max(4, 0.32 * L)))
        ax.imshow(probs_LTK[:, :, 0], cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
        for layer in range(L):
            for t in range(T):
                ax.text(t, layer, view.piece(int(ids_LTK[layer, t, 0]))[:10], ha="center", va="center", fontsize=6)
        ax.set_xticks(range(T), pieces, rotation=90, fontsize=7)
        ax.set_yticks(range(L), ["embed"] + [f"{i}" for i in range(1, L - 1)] + ["output"], fontsize=6)
        ax.set_ylabel("residual stream entering layer")
        ax.set_title("logit lens: top next token (shade: its probability)")
        _save(fig, args.png)


def cmd_neighbours(args, run) -> None:
    from transformer.infer.internals import cosine_neighbours, embedding_table

    i = one_token(run, args.word)
    table = embedding_table(run.params)
    tok = run.tokenizer
    print(f"nearest to {tok.piece(i)!r} (id {i}) by cosine over the embedding table:")
    print(ROW.format("rank", "token", "cosine"))
    for r, (j, c) in enumerate(cosine_neighbours(table, table[i], args.top, exclude=(i,)), 1):
        print(ROW.format(r, tok.piece(j), f"{c:.3f}"))


def cmd_analogy(args, run) -> None:
    from transformer.infer.internals import analogy_vector, cosine_neighbours, embedding_table

    a, b, c = (one_token(run, w) for w in (args.a, args.b, args.c))
    table = embedding_table(run.params)
    tok = run.tokenizer
    print(f"{tok.piece(a)!r} - {tok.piece(b)!r} + {tok.piece(c)!r} (the three left out):")
    print(ROW.format("rank", "token", "cosine"))
    for r, (j, cos) in enumerate(cosine_neighbours(table, analogy_vector(table, a, b, c), args.top,
                                                   exclude=(a, b, c)), 1):
        print(ROW.format(r, tok.piece(j), f"{cos:.3f}"))


def cmd_tokens(args, run) -> None:
    view = View(run, args.text)
    ids = view.src if view.src is not None else view.ids
    print(f"{len(ids)} tokens (␣ a space, ↵ a newline, <0x..> bytes of a character split across tokens):")
    for k, i in enumerate(ids):
        print(f"{k:4d} {i:8d}  {view.piece(i)}")


COMMANDS = {"next": cmd_next, "attention": cmd_attention, "lens": cmd_lens, "neighbours": cmd_neighbours,
            "analogy": cmd_analogy, "tokens": cmd_tokens}


def main(argv=None) -> int:
    args = parse(argv)
    quiet_jax_logs()
    from transformer.config import ConfigError
    from transformer.infer.loading import load_run

    try:
        run = load_run(args.checkpoint, args.step)
        COMMANDS[args.command](args, run)
    except ConfigError as e:
        die(str(e))
    except BrokenPipeError:  # the reader stopped early (| head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
