"""Command-line configuration: `--config PRESET` then dotted overrides (`--model.d_model=256 --train.steps 100`).

A preset is `configs/<name>.py` defining `overrides() -> dict` with only what differs from the defaults, nested by
section: {"model": {"n_layers": 4}, "train": {"steps": 2000}}.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

from transformer.config import _SECTIONS, Config, ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_preset(name: str) -> dict:
    path = Path(name) if name.endswith(".py") else CONFIGS_DIR / f"{name}.py"
    if not path.exists():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(known)} or give a path to a .py file")
    spec = importlib.util.spec_from_file_location(f"preset_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.overrides()


def _convert(section: str, key: str, raw, typ):
    name = f"{section}.{key}"
    origin = get_origin(typ)
    if origin is Literal:
        choices = get_args(typ)
        if raw not in choices:
            raise ConfigError(f"--{name}={raw!r} must be one of: {', '.join(map(str, choices))}")
        return raw
    if not isinstance(raw, str):  # from a preset: already typed
        if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if not isinstance(raw, typ) or (typ is int and isinstance(raw, bool)):
            raise ConfigError(f"{name}={raw!r} should be a {typ.__name__}")
        return raw
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(raw)
    except ValueError:
        raise ConfigError(f"--{name}={raw!r} is not a valid {typ.__name__}") from None


def apply_overrides(cfg: Config, overrides: dict[str, dict]) -> Config:
    sections = {}
    for section, values in overrides.items():
        if section == "preset":
            continue
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; sections are {', '.join(_SECTIONS)}")
        cls = _SECTIONS[section]
        hints = typing.get_type_hints(cls)
        current = getattr(cfg, section)
        changes = {}
        for key, raw in values.items():
            if key not in hints:
                near = ", ".join(sorted(hints))
                raise ConfigError(f"unknown option --{section}.{key}; {section} options are: {near}")
            changes[key] = _convert(section, key, raw, hints[key])
        sections[section] = dataclasses.replace(current, **changes)
    return dataclasses.replace(cfg, **sections)


def parse_args(argv: list[str], flags: tuple[str, ...] = ()) -> tuple[Config, dict[str, str | bool]]:
    """Parse `--config NAME`, `--section.key[=]value` overrides and the CLI's own `flags` (e.g. --resume).

    Returns the validated config and a dict of the CLI's own flags that were given.
    """
    preset, dotted, own = "default", {}, {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --model.d_model=256")
        key, eq, value = arg[2:].partition("=")
        if key in flags:
            own[key] = value if eq else True
            continue
        if not eq:
            if not args or args[0].startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            value = args.pop(0)
        if key == "config":
            preset = value
        elif "." in key:
            section, _, field = key.partition(".")
            dotted.setdefault(section, {})[field] = value
        else:
            raise ConfigError(f"unknown option --{key}; options look like --model.d_model=256 or --config NAME")
    cfg = Config(preset=Path(preset).stem)
    if preset != "default" or (CONFIGS_DIR / "default.py").exists():
        cfg = apply_overrides(cfg, load_preset(preset))
    cfg = apply_overrides(cfg, dotted)
    return cfg.validate(), own


def die(message: str, code: int = 2) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def persistent_compilation_cache() -> None:
    """Keep compiled programs across runs (~/.cache/transformer/jax, or $JAX_COMPILATION_CACHE_DIR): a second
    `sample.py` on the same model skips most of its compile time, which dominates the time to the first token."""
    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "transformer", "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def quiet_jax_logs() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging  # orbax reports routine events (read-only managers, ...) as warnings
    logging.set_verbosity(logging.ERROR)
