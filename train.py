"""Train a transformer language model.

    python train.py                                   # baby GPT on the embedded default corpus (no download)
    python train.py --config shakespeare_char --data.path ../shared/data/tinyshakespeare/input.txt
    python train.py --config gpt2_small --data.path roneneldan/TinyStories --train.steps 10000

Options are `--config PRESET` (a file in configs/) and dotted overrides of any config field, e.g.
`--model.d_model=256 --train.steps=100`. Re-running into an existing --train.run_dir resumes it exactly.
"""
import sys

from transformer.cli import die, parse_args, quiet_jax_logs

quiet_jax_logs()  # before jax is imported

import jax  # noqa: E402

from transformer import distributed  # noqa: E402
from transformer.config import ConfigError  # noqa: E402
from transformer.train import TrainingDiverged, run_dir_of, train  # noqa: E402


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg, flags = parse_args(argv, flags=("resume",))
        distributed.initialize()
        result = train(cfg, resume=bool(flags.get("resume")))
    except ConfigError as e:
        die(str(e))
    except TrainingDiverged as e:
        die(str(e), code=1)
    if "val_loss" in result and jax.process_index() == 0:
        print(f"done: step {result['step']}, val loss {result['val_loss']:.4f}")
    if cfg.train.task == "sft" and jax.process_index() == 0:
        print(f"talk to it: python sample.py --checkpoint {run_dir_of(cfg)} --chat")
    elif (cfg.train.sample_tokens and cfg.model.arch == "decoder" and not result.get("stopped_by")
            and jax.process_index() == 0):
        print_sample(run_dir_of(cfg), cfg.train.sample_tokens, cfg.train.seed)
    return 0


def print_sample(run_dir: str, n_tokens: int, seed: int) -> None:
    """A short sample from the checkpoint just written: the run dir alone is enough to generate."""
    from transformer.infer.loading import load_run
    from transformer.infer.sampling import Sampler, generate
    run = load_run(run_dir)
    tok = run.tokenizer
    out = generate(run.graphdef, run.params, [run.encode_prompt("\n")], max_new_tokens=n_tokens, max_len=run.cfg.model.max_len,
                   sampler=Sampler(temperature=0.8), key=jax.random.key(seed), eos_id=tok.eos_id)
    print(f"--- sample ({n_tokens} tokens, temperature 0.8; more with: python sample.py --checkpoint {run_dir}) ---")
    print(tok.decode(out.tokens[0]).strip("\n"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
