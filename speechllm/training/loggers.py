"""Loggers: a CSV log always, W&B offline by default and online when the user has a key."""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf


def wandb_mode(requested: str) -> str:
    """auto -> online only with an API key and a reachable server, so a run never waits on the network."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if not _has_wandb_key():
        return "offline"
    if not _server_reachable():
        rank_zero_warn("W&B: API key found but the server is unreachable; logging offline (`wandb sync` later)")
        return "offline"
    return "online"


def build_loggers(cfg: DictConfig, run_dir: Path, wandb_run_id: str | None) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=run_dir, name="logs", version="")]
    mode = wandb_mode(cfg.wandb.mode)
    if mode != "disabled":
        loggers.append(
            WandbLogger(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=cfg.run_name,
                id=wandb_run_id,
                resume="allow",
                save_dir=str(run_dir),
                offline=mode == "offline",
                config=OmegaConf.to_container(cfg),
            )
        )
    return loggers


def _server_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
