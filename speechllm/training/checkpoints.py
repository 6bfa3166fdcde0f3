"""Checkpoints that hold only what trains, written atomically, and loaded across stages.

Frozen encoder and LLM weights are re-created from their source (hub, local path, or the fixed-seed
random init of tiny presets) and never copied into checkpoints.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

LAST = "last.ckpt"
PREVIOUS = "last-prev.ckpt"  # the last.ckpt that the newest one replaced: a fallback if last.ckpt is damaged
META_KEY = "speechllm"
# Model settings that change no tensor shape or meaning: a checkpoint may differ in these.
_COMPATIBLE_KEYS = {
    "lora.dropout", "llm.prompt_prefix", "llm.answer_prefix", "llm.attn_implementation", "llm.gradient_checkpointing",
    "llm.loss_chunk_tokens",
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here, with the reason in one line."""


class UnreadableCheckpoint(CheckpointError):
    """A file that does not load at all (truncated, overwritten, not a checkpoint)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same directory, fsync, then rename over the target.

    A kill at any moment leaves either the previous complete file or the new complete file. Before
    writing, the free disk space is checked against the checkpoint's size; a write that fails anyway
    (disk full, permissions) is one CheckpointError line and leaves the previous file untouched.
    Replacing last.ckpt keeps the file it replaces as last-prev.ckpt (a hard link: no copy).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot write checkpoints in {path.parent} ({_reason(err)})") from None
        check_free_space(path, checkpoint_bytes(checkpoint))
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if path.name == LAST and path.is_file():
                _keep_as(path, path.with_name(PREVIOUS))
            os.replace(tmp, path)
        except OSError as err:
            raise CheckpointError(
                f"{path}: writing the checkpoint failed ({_reason(err)}); the previous checkpoint is untouched"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def checkpoint_bytes(tree: Any) -> int:
    """Bytes of the tensors in a checkpoint: what torch.save writes, give or take the pickled metadata."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(checkpoint_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in tree)
    return 0


def check_free_space(path: Path, size: int) -> None:
    """Refuse to start a write that cannot finish: a full disk would fail it halfway, after minutes."""
    needed = int(size * 1.1) + (1 << 20)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise CheckpointError(
            f"{path}: not enough disk space for the checkpoint (needs about {needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free in {path.parent}); free some space or set output_dir to another disk"
        )


def check_writable(directory: Path) -> None:
    """Fail at start-up, not at the first checkpoint, when the checkpoint directory cannot be written."""
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(
            f"{directory}: checkpoints cannot be written there ({_reason(err)}); "
            "fix the directory or set output_dir / run_name to a writable place"
        ) from None


def _keep_as(path: Path, previous: Path) -> None:
    tmp = previous.with_name(f".{previous.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)


def _reason(err: OSError) -> str:
    return f"{err.strerror}: {err.filename}" if err.strerror and err.filename else err.strerror or str(err)


def resolve_checkpoint(source: str | Path, key: str) -> Path:
    """A checkpoint file, or a run directory (-> its checkpoints/last.ckpt)."""
    path = Path(source)
    if path.is_dir():
        path = path / "checkpoints" / LAST
    if not path.is_file():
        raise CheckpointError(f"{key}: no checkpoint at {path}")
    return path


def read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip and EOF errors all mean the same thing here
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UnreadableCheckpoint(f"{path}: unreadable checkpoint ({type(err).__name__}: {cause})") from None


def newest_readable(directory: Path, exclude: Path | None = None) -> tuple[Path, int] | None:
    """The readable checkpoint with the highest global step in `directory` (last-prev, best-k, ...)."""
    found = []
    for path in sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        try:
            found.append((read_checkpoint(path).get("global_step", -1), path))
        except UnreadableCheckpoint:
            continue
    if not found:
        return None
    step, path = max(found, key=lambda entry: entry[0])
    return path, step


def rng_states() -> dict[str, Any]:
    """This process's random generators (torch, CUDA device, numpy, python): what dropout and friends draw from.

    Plain tensors, lists and numbers only, so that Lightning's `weights_only` checkpoint loading accepts them.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def model_config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys of the model config that differ (ignoring settings that change no weights)."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    keys = set(flat_saved) | set(flat_current)
    return sorted(k for k in keys if k not in _COMPATIBLE_KEYS and flat_saved.get(k) != flat_current.get(k))


def check_compatible(checkpoint: dict, model_cfg: DictConfig, path: Path) -> None:
    saved = checkpoint.get(META_KEY, {}).get("model_config")
    if saved is None:
        raise CheckpointError(f"{path}: not a speechllm checkpoint (no model config inside)")
    diff = model_config_differences(saved, OmegaConf.to_container(model_cfg))
    if diff:
        raise CheckpointError(f"{path}: model config differs from this run in {', '.join(diff)}")


def read_compatible(source: str | Path, model_cfg: DictConfig, key: str = "init_from") -> dict:
    """The checkpoint at `source` (file or run directory), refused unless its model config matches this one."""
    path = resolve_checkpoint(source, key)
    checkpoint = read_checkpoint(path)
    check_compatible(checkpoint, model_cfg, path)
    return checkpoint


def load_trained_weights(module, source: str | Path, checkpoint: dict | None = None) -> list[str]:
    """init_from: copy a previous stage's trained groups into `module.model`; returns the groups loaded.

    `checkpoint` is `read_compatible(source, ...)` when the caller has already read it (to fail before
    building the model). Groups absent from the checkpoint (e.g. LoRA after stage 1) keep their fresh
    initialisation. Optimizer, scheduler, step and sampler state are deliberately not carried over.
    """
    path = resolve_checkpoint(source, "init_from")
    if checkpoint is None:
        checkpoint = read_compatible(path, module.cfg.model)
    state = checkpoint["state_dict"]
    loaded = []
    for group, params in module.model.trainable_groups().items():
        keys = {f"model.{name}" for name in params}
        present = keys & state.keys()
        if present and present != keys:
            raise CheckpointError(f"{path}: group '{group}' is incomplete ({len(keys - present)} tensors missing)")
        if present:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(state[f"model.{name}"])
            loaded.append(group)
    return loaded


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}
