"""The command-line tools run inside the test process: `run("train.py", "--train.steps=3")`, `run("sample.py", ...)`,
`run("-m", "transformer.export", ...)` give what `subprocess.run([python, ...], capture_output=True, text=True)` gives
(returncode, stdout, stderr), without a new interpreter importing jax, flax and orbax for every call (~3 s each on a
2-core VM, a quarter of this suite's time when every CLI test spawned one).

What stays the same as a process of its own: the tools' `main(argv)`, their exit codes (a `sys.exit` / `die` becomes
the returncode), everything they print (through `sys.stdout` / `sys.stderr`), stdin (a string, never a terminal),
the working directory and extra environment variables, and the devices: the tool sees one CPU device, as a
`python train.py` on a laptop does, not this session's eight fake ones. What a process of its own adds, and these do
not test: the interpreter's start, import-time side effects, C++ log lines on the real stderr, signals. The tests
of those (a one-line error on a fresh interpreter, SIGTERM, several processes) keep `subprocess`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import subprocess
import sys
from unittest import mock

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPTS: dict[str, object] = {}


def _main(target: str):
    if target.endswith(".py"):  # train.py / sample.py at the repository root
        if target not in _SCRIPTS:
            spec = importlib.util.spec_from_file_location(f"cli_{target[:-3]}", os.path.join(REPO, target))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _SCRIPTS[target] = module
        return _SCRIPTS[target].main
    return importlib.import_module(target).main


@contextlib.contextmanager
def _one_device():
    """jax.devices() and friends name the first device only, so that a tool lays out its mesh on one device."""
    first = jax.devices()[:1]
    with mock.patch.object(jax, "devices", lambda *a, **k: first), \
            mock.patch.object(jax, "local_devices", lambda *a, **k: first), \
            mock.patch.object(jax, "device_count", lambda *a, **k: 1), \
            mock.patch.object(jax, "local_device_count", lambda *a, **k: 1):
        yield


def run(*argv: str, stdin: str | None = None, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`argv` as after `python`: a script ("train.py", ...) or "-m", a module, then the arguments."""
    argv = list(map(str, argv))
    if argv[0] == "-m":
        target, args = argv[1], argv[2:]
    else:
        target, args = argv[0], argv[1:]
    out, err = io.StringIO(), io.StringIO()
    saved_cwd = os.getcwd()
    with mock.patch.dict(os.environ, env or {}), mock.patch.object(sys, "stdin", io.StringIO(stdin or "")), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _one_device():
        os.chdir(cwd or REPO)
        try:
            code = _main(target)(args)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:  # sys.exit("message"): printed to stderr, status 1
                print(e.code, file=sys.stderr)
                code = 1
        finally:
            os.chdir(saved_cwd)
    return subprocess.CompletedProcess([sys.executable, *argv], code or 0, out.getvalue(), err.getvalue())
