"""What a run shows and records: a progress bar or plain lines, the metrics JSONL file, and the signals that stop
a run cleanly (SIGTERM on preemption, Ctrl-C)."""
from __future__ import annotations

import json
import os
import signal

from transformer.config import Config

METRICS_FILE = "metrics.jsonl"


class Progress:
    """tqdm bar on a terminal (or when asked), a plain line per log interval otherwise; always a JSONL file."""

    def __init__(self, cfg: Config, run_dir: str, start: int, is_main: bool):
        self.is_main = is_main
        self.jsonl = open(os.path.join(run_dir, METRICS_FILE), "a") if is_main else None
        self.bar = None
        if is_main and cfg.train.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)

    def log(self, record: dict, message: str, permanent: bool = False) -> None:
        """Append the record to the JSONL file; show the message in the bar, or as its own line if permanent."""
        if not self.is_main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.bar is not None and not permanent:
            self.bar.set_postfix_str(message, refresh=False)
        else:
            self.write(f"step {record['step']}: {message}")

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, message: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()


class StopFlag:
    """SIGTERM (preemption) and Ctrl-C set a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
