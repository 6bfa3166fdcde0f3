"""A self-contained directory for inference without Lightning: `SpeechLLM.save_pretrained` / `from_pretrained`.

```
speechllm.yaml          the model config (paths below relative to the directory) and where it came from
trained.safetensors     layer weights, downsampler, projection
adapter/                the LoRA adapter in peft's format (PeftModel.save_pretrained); absent when merged
encoder/ llm/ tokenizer/  the frozen encoder and LLM (LoRA merged in with merge_lora) and the tokenizer,
                        each with HF save_pretrained
```

Unlike checkpoints, which hold only what trains and rebuild the frozen parts from their source, an
export carries the frozen weights too, so it loads with no hub, no cache and no fixed-seed rebuild.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file, save_file

from speechllm.config import ModelConfig

if TYPE_CHECKING:
    from speechllm.model.speech_llm import SpeechLLM

EXPORT_CONFIG = "speechllm.yaml"
TRAINED_WEIGHTS = "trained.safetensors"
FORMAT_VERSION = 1
_PARTS = ("encoder", "llm", "tokenizer", "adapter")
_STORED_GROUPS = ("layer_weights", "downsampler", "projection")  # LoRA goes to adapter/ (or into llm/)


class ExportError(ValueError):
    """A directory that is not (or cannot become) a speechllm export; one line."""


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_CONFIG).is_file()


def check_target(out: str | Path) -> Path:
    """`out` if an export may be written there: a new or empty directory, or a previous export."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and (is_export(out) or not any(out.iterdir()))):
        raise ExportError(f"{out}: exists and is not an empty directory or a speechllm export; choose another --out")
    return out


def save_pretrained(model: "SpeechLLM", out: str | Path, merge_lora: bool = False, metadata: dict | None = None) -> Path:
    """Write `model` to `out` (created; a previous export there is replaced). The model is not modified.

    merge_lora: fold the adapter into the LLM's weights (peft merge_and_unload) and save that LLM
    alone, no adapter/. `metadata` (e.g. the source checkpoint) is recorded in speechllm.yaml.
    """
    out = check_target(out)
    for part in (*_PARTS, EXPORT_CONFIG, TRAINED_WEIGHTS):
        if (out / part).is_dir():
            shutil.rmtree(out / part)
        (out / part).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    groups = model.trainable_groups()
    tensors = {name: p.detach().cpu().contiguous() for g in _STORED_GROUPS for name, p in groups[g].items()}
    save_file(tensors, out / TRAINED_WEIGHTS)
    model.encoder.model.save_pretrained(out / "encoder")
    model.tokenizer.save_pretrained(out / "tokenizer")
    has_lora = isinstance(model.llm, PeftModel)
    if has_lora and not merge_lora:
        model.llm.save_pretrained(out / "adapter")
    _base_llm(model.llm, merge_lora).save_pretrained(out / "llm")

    cfg = copy.deepcopy(model.cfg)
    cfg.encoder.pretrained, cfg.encoder.architecture = "encoder", {}  # the saved HF configs hold the architecture
    cfg.llm.pretrained, cfg.llm.architecture, cfg.llm.tokenizer = "llm", {}, "tokenizer"
    lora = "adapter" if has_lora and not merge_lora else "merged" if has_lora else "none"
    if lora != "adapter":
        cfg.lora.rank = 0
    document = {"format": FORMAT_VERSION, "lora": lora, "model": dataclasses.asdict(cfg), **(metadata or {})}
    OmegaConf.save(OmegaConf.create(document), out / EXPORT_CONFIG)
    return out


def run_precision(path: str | Path) -> str:
    """The Lightning precision the exported run trained in (`speechllm export` records it; fp32 if not)."""
    return str(OmegaConf.load(Path(path) / EXPORT_CONFIG).get("precision", "32-true"))


def from_pretrained(path: str | Path, cls: type["SpeechLLM"]) -> "SpeechLLM":
    """The model saved in `path` by save_pretrained, in eval mode, on the CPU."""
    path = Path(path)
    if not is_export(path):
        raise ExportError(f"{path}: no {EXPORT_CONFIG} there (make one with `speechllm export`)")
    document = OmegaConf.load(path / EXPORT_CONFIG)
    if document.get("format") != FORMAT_VERSION:
        raise ExportError(f"{path / EXPORT_CONFIG}: format {document.get('format')}, expected {FORMAT_VERSION}")
    cfg: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), document.model))
    cfg.encoder.pretrained = _inside(path, cfg.encoder.pretrained)
    cfg.llm.pretrained = _inside(path, cfg.llm.pretrained)
    cfg.llm.tokenizer = _inside(path, cfg.llm.tokenizer)
    adapter = document.lora == "adapter"
    bare = copy.deepcopy(cfg)
    bare.lora.rank = 0  # the adapter is loaded as peft saved it, not injected afresh
    model = cls(bare)
    if adapter:
        model.llm = PeftModel.from_pretrained(model.llm, path / "adapter")
    model.cfg = cfg
    state = load_file(path / TRAINED_WEIGHTS)
    expected = {name for g in _STORED_GROUPS for name in model.trainable_groups()[g]}
    if set(state) != expected:
        raise ExportError(f"{path / TRAINED_WEIGHTS}: holds {sorted(state)}, expected {sorted(expected)}")
    model.load_state_dict(state, strict=False)
    model.requires_grad_(False)
    return model.eval()


def _base_llm(llm: torch.nn.Module, merge: bool) -> torch.nn.Module:
    """The plain HF LLM: without the adapter, or with it merged in; a copy, so `llm` keeps its adapter."""
    if not isinstance(llm, PeftModel):
        return llm
    llm = copy.deepcopy(llm)
    return llm.merge_and_unload() if merge else llm.unload()


def _inside(root: Path, source: str | None) -> str | None:
    """A path stored relative to the export directory; anything else (a hub name) as it is."""
    if source and (root / source).exists():
        return str(root / source)
    return source
