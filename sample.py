"""Generate text from a run directory written by train.py (its config, tokenizer and params are all it needs).
The run is loaded once and its model's architecture decides what to do; an option that architecture does not use is
refused (one line, exit code 2) rather than ignored.

    python sample.py --checkpoint runs/default --prompt "The with statement"
    python sample.py --checkpoint runs/shakespeare_char --prompt "ROMEO:" --num-samples 3 --top-k 40 --temperature 0.8
    echo "KING:" | python sample.py --checkpoint runs/shakespeare_char --greedy --max-new-tokens 200

Pretrained models (a Hugging Face directory or a .gguf file) load the same way; --chat talks through the model's
own chat template (interactive on a terminal, one user turn per line of piped stdin):

    python sample.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --chat --system "You are a terse assistant."
    echo "What is the capital of France?" | python sample.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf --chat

Encoder-decoder runs (translation; beam search with --beam 4 by default, --beam 1 for greedy):

    python sample.py --checkpoint runs/multi30k_de_en --source "Ein Mann fährt Fahrrad."
    python sample.py --checkpoint runs/multi30k_de_en --source-file test.de > test.hyp.en

Encoder runs (model.arch=encoder, or a Hugging Face BERT-family directory given as --checkpoint):

    python sample.py --checkpoint runs/bert_mlm_tiny --fill-mask "The function returns a [MASK] object."
    python sample.py --checkpoint runs/classify_tiny --classify "a wonderful, moving film"
    python sample.py --checkpoint path/to/all-MiniLM-L6-v2 --embed "A man is playing a guitar." "Someone plays music."
"""
import argparse
import sys

from transformer.cli import die, persistent_compilation_cache, quiet_jax_logs


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other bad input
        die(f"{message} (see --help)")


def parse(ap, argv):
    ap.add_argument("--checkpoint", required=True,
                    help="run directory written by train.py, a Hugging Face model directory or a .gguf file")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: stdin when piped, else a newline)")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    src.add_argument("--source", metavar="TEXT", help="encoder-decoder: translate TEXT")
    src.add_argument("--source-file", metavar="FILE", help="encoder-decoder: translate FILE line by line to stdout")
    ap.add_argument("--beam", type=int, default=4, help="encoder-decoder: beam size (1: greedy or sampling)")
    ap.add_argument("--length-penalty", type=float, default=0.6, help="beam search: GNMT length penalty alpha")
    src.add_argument("--fill-mask", metavar="TEXT", help="encoders: top predictions for each [MASK] in TEXT")
    src.add_argument("--classify", metavar="TEXT", nargs="+", help="encoders: label probabilities of each TEXT")
    src.add_argument("--embed", metavar="TEXT", nargs="+",
                     help="encoders: sentence embeddings of each TEXT and their cosine similarities")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=500)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 keeps all")
    ap.add_argument("--min-p", type=float, default=0.0,
                    help="keep tokens at least this fraction as likely as the best one; 0 keeps all")
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="divide (positive) logits of tokens already in the context by this; 1 is off")
    ap.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    ap.add_argument("--chat", action="store_true",
                    help="decoders with a chat template: a conversation (interactive, or one turn per stdin line)")
    ap.add_argument("--system", metavar="TEXT", help="--chat: the system prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop a sample at this text (repeatable)")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                    help="print tokens as they come (default: on when stdout is a terminal)")
    ap.add_argument("--window", action=argparse.BooleanOptionalAction, default=True,
                    help="slide the context window when prompt + generation exceed it (default: on)")
    args = ap.parse_args(argv)
    if args.temperature < 0:
        die(f"--temperature={args.temperature} must be >= 0")
    if not 0.0 < args.top_p <= 1.0:
        die(f"--top-p={args.top_p} must be in (0, 1]")
    if args.top_k < 0:
        die(f"--top-k={args.top_k} must be >= 0 (0 keeps all tokens)")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        die("--max-new-tokens and --num-samples must be >= 1")
    if args.beam < 1:
        die(f"--beam={args.beam} must be >= 1")
    if not 0.0 <= args.min_p < 1.0:
        die(f"--min-p={args.min_p} must be in [0, 1)")
    if args.repetition_penalty <= 0:
        die(f"--repetition-penalty={args.repetition_penalty} must be > 0 (1 is off)")
    if args.system is not None and not args.chat:
        die("--system needs --chat")
    if args.chat and (args.prompt is not None or args.prompt_file or args.num_samples != 1):
        die("--chat takes its turns from the terminal or stdin: drop --prompt / --prompt-file / --num-samples")
    return args


# What each architecture does with the options: one given that its run ignores is an error, not silently dropped.
COMMON = {"checkpoint", "step"}
APPLIES = {
    "decoder": {"prompt", "prompt_file", "num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "greedy",
                "seed", "stop", "stream", "window", "min_p", "repetition_penalty", "chat", "system"},
    "encoder_decoder": {"source", "source_file", "beam", "length_penalty", "max_new_tokens", "temperature", "top_k",
                        "top_p", "greedy", "seed"},
    "encoder": {"fill_mask", "classify", "embed", "top_k"},
}
WHAT = {"decoder": "a decoder (text generation: --prompt)",
        "encoder_decoder": "an encoder-decoder (translation: --source / --source-file)",
        "encoder": "an encoder (--fill-mask, --classify or --embed)"}


def check_options(ap, args, arch: str) -> None:
    """A ConfigError naming the first option given on the command line that a run of `arch` does not use."""
    from transformer.config import ConfigError

    for action in ap._actions:
        dest = action.dest
        if dest in COMMON | APPLIES[arch] or dest == "help" or getattr(args, dest) == action.default:
            continue
        raise ConfigError(f"{action.option_strings[0]} does not apply to {args.checkpoint}, which holds "
                          f"{WHAT[arch]}; drop it")
    if arch == "encoder" and not (args.fill_mask or args.classify or args.embed):
        raise ConfigError(f"{args.checkpoint} holds {WHAT[arch]}: give --fill-mask, --classify or --embed")
    if arch == "encoder_decoder" and args.source is None and not args.source_file:
        raise ConfigError(f"{args.checkpoint} holds {WHAT[arch]}: give --source TEXT or --source-file FILE")


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            die(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}")
    if not sys.stdin.isatty():
        return sys.stdin.read()
    return "\n"


def translate_main(args, run) -> int:
    import jax

    from transformer.config import ConfigError
    from transformer.infer.evaluate import translate_texts
    from transformer.infer.sampling import Sampler

    try:
        if args.source_file:
            try:
                with open(args.source_file, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read --source-file {args.source_file}: {e}") from None
        else:
            lines = [args.source]
    except ConfigError as e:
        die(str(e))
    # Translation is deterministic by default (beam search, or greedy with --beam 1); with --beam 1, a temperature
    # other than 1, --top-k or --top-p samples instead.
    sampling = args.beam == 1 and not args.greedy and (args.temperature != 1.0 or args.top_k or args.top_p < 1.0)
    sampler = Sampler(args.temperature, args.top_k, args.top_p) if sampling else Sampler(0.0)
    chunk = 64  # sentences per call: printed as they are done, in input order
    for start in range(0, len(lines), chunk):
        T = run.cfg.model.max_len
        outs = translate_texts(run.graphdef, run.params, run.tokenizer, T, lines[start:start + chunk],
                               beam=args.beam, length_penalty=args.length_penalty, sampler=sampler,
                               key=jax.random.key(args.seed), max_new_tokens=min(T, args.max_new_tokens))
        for out in outs:
            print(out, flush=True)
    return 0


def encoder_main(args, run) -> int:
    from transformer.config import ConfigError
    from transformer.infer import encode

    try:
        if args.fill_mask:
            for i, preds in enumerate(encode.fill_mask(run, args.fill_mask, top_k=max(args.top_k, 5))):
                print(f"[MASK] {i + 1}: " + "  ".join(f"{t!r} {p:.3f}" for t, p in preds))
        elif args.classify:
            names = run.labels or [str(i) for i in range(run.cfg.model.n_classes)]
            for text, probs in zip(args.classify, encode.classify(run, args.classify)):
                best = sorted(zip(names, probs), key=lambda x: -x[1])
                print(f"{text!r}: " + "  ".join(f"{n} {p:.3f}" for n, p in best))
        else:
            emb = encode.embed(run, args.embed)
            for text, e in zip(args.embed, emb):
                print(f"{text!r}: [{', '.join(f'{v:.4f}' for v in e[:8])}, ...] ({len(e)} dims)")
            for i in range(len(emb)):
                for j in range(i + 1, len(emb)):
                    print(f"cosine({args.embed[i]!r}, {args.embed[j]!r}) = {float(emb[i] @ emb[j]):.4f}")
    except ConfigError as e:
        die(str(e))
    return 0


def sampler_of(args):
    from transformer.infer.sampling import Sampler

    return Sampler(0.0 if args.greedy else args.temperature, args.top_k, args.top_p, args.min_p,
                   args.repetition_penalty)


def chat_main(args, run) -> int:
    """A conversation through the model's chat template: each user turn and the replies so far are re-rendered
    whole, so the template decides every separator; the reply streams as it is generated."""
    import jax

    from transformer.config import ConfigError
    from transformer.infer import chat

    try:
        chat.require_chat_template(run.tokenizer)  # before the first turn is asked for
    except ConfigError as e:
        die(f"{args.checkpoint}: {e}")
    stream = sys.stdout.isatty() if args.stream is None else args.stream

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def user_turns():
        """Lines typed at the prompt until an empty one or end of input; else each non-empty stdin line."""
        if not sys.stdin.isatty():
            yield from (line for line in sys.stdin.read().splitlines() if line.strip())
            return
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return
            if not line.strip():
                return
            yield line

    messages = [{"role": "system", "content": args.system}] if args.system else []
    sampler = sampler_of(args)
    for n, user in enumerate(user_turns()):
        messages.append({"role": "user", "content": user})
        try:
            text = chat.reply(run, messages, sampler, max_new_tokens=args.max_new_tokens,
                              key=jax.random.fold_in(jax.random.key(args.seed), n), on_text=write if stream else None)
        except ConfigError as e:
            die(str(e))
        print("" if stream else text)
        messages.append({"role": "assistant", "content": text})
    return 0


def decoder_main(args, run) -> int:
    import jax

    from transformer.config import ConfigError
    from transformer.infer.sampling import generate

    if args.chat:
        return chat_main(args, run)
    prompt = read_prompt(args)
    tok = run.tokenizer
    max_len = run.cfg.model.max_len
    try:
        ids = run.encode_prompt(prompt)
        if not args.window and len(ids) + args.max_new_tokens > max_len:
            raise ConfigError(f"prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceed the "
                              f"model's context of {max_len} tokens and --no-window is set")
        stops = [tok.encode(s).tolist() for s in args.stop if s]
    except ConfigError as e:
        die(str(e))

    sampler = sampler_of(args)
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    stream = stream and args.num_samples == 1

    def on_tokens(rows):
        sys.stdout.write(tok.decode(rows[0]))
        sys.stdout.flush()

    if stream:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    out = generate(run.graphdef, run.params, [ids] * args.num_samples, max_new_tokens=args.max_new_tokens,
                   max_len=max_len, sampler=sampler, key=jax.random.key(args.seed), eos_id=tok.eos_id,
                   pad_id=tok.pad_id or 0, stop_sequences=stops, window=args.window,
                   chunk=16 if stream else None, on_tokens=on_tokens if stream else None)
    for i, row in enumerate(out.tokens):
        text = tok.decode(row)
        for s in args.stop:  # token-level stops can overshoot a multi-token stop string: cut the text exactly
            if s and s in text:
                text = text[:text.index(s) + len(s)]
        if stream:
            sys.stdout.write("\n")  # the text is already on the terminal
        else:
            if i:
                print("\n---")
            print(prompt + text)
    return 0


MODES = {"decoder": decoder_main, "encoder_decoder": translate_main, "encoder": encoder_main}


def main(argv) -> int:
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parse(ap, argv)
    quiet_jax_logs()
    persistent_compilation_cache()
    from transformer.config import ConfigError
    from transformer.infer.loading import load_run

    try:  # the run is loaded once; its architecture decides what to do and which options apply
        run = load_run(args.checkpoint, args.step, background=args.chat)  # --chat compiles while weights load
        check_options(ap, args, run.cfg.model.arch)
    except ConfigError as e:
        die(str(e))
    return MODES[run.cfg.model.arch](args, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
