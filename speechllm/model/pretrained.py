"""How frozen components come into being: `from_pretrained` for real models, seeded `from_config` for tiny ones."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")

# Randomly initialised "pretrained" parts stand in for hub weights, so they must be the same in every
# run, stage and resume: they are built under this fixed seed, whatever the run's own seed is.
FROZEN_INIT_SEED = 0


class ModelSourceError(RuntimeError):
    """A pretrained model that cannot be loaded, with the config key to fix."""


def from_pretrained(cls, name_or_path: str, config_key: str, **config_overrides):
    """`cls.from_pretrained` with a one-line error naming the config key when the source is unreachable."""
    try:
        return cls.from_pretrained(name_or_path, **config_overrides)
    except OSError as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSourceError(
            f"{config_key}={name_or_path!r} cannot be loaded ({cause}); without network access set "
            f"{config_key} to a local directory holding the model files, or pre-fill the HF cache (HF_HOME)"
        ) from None


def seeded_init(build: Callable[[], T], seed: int = FROZEN_INIT_SEED) -> T:
    """Run `build` under a fixed RNG seed without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
