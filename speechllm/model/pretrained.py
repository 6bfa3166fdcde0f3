"""How frozen components come into being: `from_pretrained` for real models, seeded `from_config` for tiny ones."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

import torch

T = TypeVar("T")

# Randomly initialised "pretrained" parts stand in for hub weights, so they must be the same in every
# run, stage and resume: they are built under this fixed seed, whatever the run's own seed is.
FROZEN_INIT_SEED = 0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class ModelSourceError(RuntimeError):
    """A pretrained model that cannot be loaded, with the config key to fix."""


def from_pretrained(cls, name_or_path: str, config_key: str, **config_overrides):
    """`cls.from_pretrained` with a one-line error naming the config key when the source is unreachable.

    When the hub cannot be reached, a hub name is read from the local HF cache only (as a local
    directory, so nothing touches the network): the hub client would otherwise retry every file for
    about a minute before giving up.
    """
    source = name_or_path
    if Path(name_or_path).expanduser().exists():
        source = str(Path(name_or_path).expanduser())
    elif name_or_path.startswith(("/", ".", "~")):
        raise ModelSourceError(f"{config_key}: no directory {name_or_path}; set it to a local model directory or a hub name")
    elif not hub_reachable():
        source = _cached_snapshot(name_or_path, config_key)
    try:
        return cls.from_pretrained(source, **config_overrides)
    except (OSError, ValueError) as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSourceError(
            f"{config_key}={name_or_path!r} cannot be loaded ({cause}); set {config_key} to a local directory "
            "holding the model files, or to a hub name that exists"
        ) from None


def _cached_snapshot(name: str, config_key: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repository name at all
        raise ModelSourceError(
            f"{config_key}={name!r} is not in the HF cache and the hub ({_hub_endpoint()}) cannot be reached; "
            f"set {config_key} to a local directory holding the model files (e.g. `hf download {name} --local-dir "
            "DIR` where there is network), or pre-fill the HF cache (HF_HOME)"
        ) from None


def check_model_sources(model_cfg) -> None:
    """Find every pretrained source of the model (configs only, no weights), so a wrong name fails at start-up."""
    from transformers import AutoConfig, AutoTokenizer

    llm = model_cfg.llm
    if model_cfg.encoder.pretrained:
        from_pretrained(AutoConfig, model_cfg.encoder.pretrained, "model.encoder.pretrained")
    if llm.pretrained:
        from_pretrained(AutoConfig, llm.pretrained, "model.llm.pretrained")
    if llm.tokenizer and llm.tokenizer not in ("byt5", llm.pretrained):
        from_pretrained(AutoTokenizer, llm.tokenizer, "model.llm.tokenizer")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """False in HF offline mode or when the hub's host does not answer within `timeout` (asked once per process)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True  # only the proxy knows; let the hub client try
    url = urlparse(_hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def seeded_init(build: Callable[[], T], seed: int = FROZEN_INIT_SEED) -> T:
    """Run `build` under a fixed RNG seed without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
