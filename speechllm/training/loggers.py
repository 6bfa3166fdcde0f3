"""Loggers: a CSV log always, W&B offline by default and online when the user has a key."""

from __future__ import annotations

import csv
import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
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


def build_loggers(
    cfg: DictConfig, run_dir: Path, wandb_run_id: str | None, resume_step: int | None = None
) -> list[Logger]:
    """`resume_step`: the step a resumed run continues from (its CSV log keeps the rows before it)."""
    loggers: list[Logger] = [ResumableCSVLogger(save_dir=run_dir, name="logs", version="", resume_step=resume_step)]
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


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run continues the metrics file of the interrupted one.

    (Lightning deletes an existing metrics.csv.) Rows from the checkpoint's step on are dropped: the
    resumed run logs those steps again.
    """

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.resume_step)
        return self._experiment


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__ on an existing directory
        if self.resume_step is None or not self._fs.isfile(self.metrics_file_path):
            return super()._check_log_dir_exists()
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if row.get("step") and int(float(row["step"])) < self.resume_step]
            keys = list(reader.fieldnames or [])
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(keys)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def finish_loggers(loggers: list[Logger]) -> None:
    """End the W&B run, so that a later run in the same process (stage 2 after stage 1) starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
