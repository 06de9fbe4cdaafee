"""Hugging Face hub datasets, quickly and quietly: with HF_HUB_OFFLINE=1, or when the hub does not answer a quick
connection check, from the local cache alone, and a one-line error within seconds when the dataset is not there
(the libraries' own retries take ~25 s and print 20+ warning lines)."""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import urllib.parse
import urllib.request
import warnings

from transformer.config import ConfigError, first_line

# Loggers of the libraries a hub load goes through. Without network they print a warning per retry (20+ lines over
# ~25 s before the error); our one-line ConfigError says all of it.
_HUB_LOGGERS = ("datasets", "huggingface_hub", "httpx", "httpcore", "urllib3", "fsspec", "filelock")


def hub_dataset(path: str, name: str, split: str, streaming: bool = False):
    """One split of a Hugging Face hub dataset (with `streaming`, an iterable that downloads as it is read). With
    HF_HUB_OFFLINE=1, or when the hub does not answer a quick connection check, from the local cache alone (not
    streamed): no network, and an error within seconds when it is not there."""
    import datasets

    forced_offline = datasets.config.HF_HUB_OFFLINE  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, read at import
    endpoint = datasets.config.HF_ENDPOINT  # HF_ENDPOINT or https://huggingface.co
    offline = forced_offline or not hub_reachable(endpoint)
    try:
        with _quiet_hub_libraries(), _hub_offline_mode(offline):
            return datasets.load_dataset(path, name or None, split=split, streaming=streaming and not offline)
    except Exception as e:  # unknown name, bad split, ...: all one-line user errors
        if offline and isinstance(e, ConnectionError):  # what offline mode raises for a dataset not in the cache
            why = ("offline mode is on (HF_HUB_OFFLINE=1)" if forced_offline else
                   f"the Hugging Face hub ({urllib.parse.urlsplit(endpoint).hostname}) is unreachable")
            raise ConfigError(f"could not load {path!r} (split {split!r}): {why} and the dataset is not in the local "
                              "cache; use a local file for data.path or run on a connected machine") from None
        source = "the local Hugging Face cache" if offline else "the Hugging Face hub"
        raise ConfigError(f"could not load {path!r} (split {split!r}) from {source} and it is not a local file: "
                          f"{type(e).__name__}: {first_line(e)}") from None


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (or to the proxy the libraries would use for it) opens within `timeout`
    seconds, name resolution included: that ignores socket timeouts, hence the thread, left behind if it hangs."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    opened, done = [], threading.Event()

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:  # refused, no route, unknown host, timed out
            pass
        done.set()

    threading.Thread(target=connect, daemon=True).start()
    done.wait(timeout)
    return bool(opened)


@contextlib.contextmanager
def _quiet_hub_libraries():
    loggers = [logging.getLogger(n) for n in _HUB_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _hub_offline_mode(offline: bool):
    """HF_HUB_OFFLINE=1 for one call: both libraries read the variable once, at import, into these two flags."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
