"""Train a transformer language model.

    python train.py                                   # baby GPT on the embedded default corpus (no download)
    python train.py --config shakespeare_char --data.path ../shared/data/tinyshakespeare/input.txt
    python train.py --config gpt2_small --data.path roneneldan/TinyStories --train.steps 10000

Options are `--config PRESET` (a file in configs/) and dotted overrides of any config field, e.g.
`--model.d_model=256 --train.steps=100`. Re-running into an existing --train.run_dir resumes it exactly.
"""
import sys

from transformer.cli import die, parse_args, quiet_jax_logs


def main(argv: list[str]) -> int:
    quiet_jax_logs()
    from transformer.config import ConfigError
    from transformer.trainer import TrainingDiverged, train
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg, flags = parse_args(argv, flags=("resume",))
        result = train(cfg, resume=bool(flags.get("resume")))
    except ConfigError as e:
        die(str(e))
    except TrainingDiverged as e:
        die(str(e), code=1)
    if "val_loss" in result:
        print(f"done: step {result['step']}, val loss {result['val_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
