"""Train one stage under Lightning DDP (or FSDP); each rank writes checksums of its trained weights and its batches.

    python tests/integration/ddp_train.py OUT_DIR [--naive] [--inf-loss=RANK:STEP] STAGE_FILE [key=value ...]

Lightning starts the other ranks by running this command line again (with LOCAL_RANK set), so every
rank runs `train()` and writes OUT_DIR/rank<N>.json. `--naive` swaps in the freezing that the
StageScheduler avoids, for the regression guard: requires_grad follows the current phase and is
flipped at the phase boundary, after DDP wrapped the model. `--inf-loss` makes one rank's loss infinite at
one step (its gradients stay finite): only that rank can see the fault, yet every rank must skip the step.
Under FSDP (`trainer.strategy=fsdp`) the trained weights are gathered from all ranks' shards first, and
OUT_DIR/rank<N>.pt holds them (full tensors) for comparison with a DDP run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from speechllm.config import load_config
from speechllm.training.module import SpeechLLMModule
from speechllm.training.run import train
from speechllm.training.stage_scheduler import StageScheduler


def _record_batches(seen: list[list[str]], weights: list[str], inf_loss: tuple[int, int] | None) -> None:
    training_step = SpeechLLMModule.training_step

    def recording_step(self, batch, batch_idx):
        seen.append(list(batch.ids))
        weights.append(_checksum({k: v for k, v in self.named_parameters() if v.requires_grad}))
        loss = training_step(self, batch, batch_idx)
        if inf_loss == (self.global_rank, self.global_step):
            loss = loss + float("inf")
        return loss

    SpeechLLMModule.training_step = recording_step


def _naive_freezing() -> None:
    on_train_batch_start = StageScheduler.on_train_batch_start

    def set_requires_grad(pl_module, train: frozenset[str]) -> None:
        for group, params in pl_module.model.trainable_groups().items():
            for param in params.values():
                param.requires_grad_(group in train)

    def setup(self, trainer, pl_module, stage):
        set_requires_grad(pl_module, self.plan.phases[0].train)

    def phase_following_batch_start(self, trainer, pl_module, batch, batch_idx):
        on_train_batch_start(self, trainer, pl_module, batch, batch_idx)
        set_requires_grad(pl_module, self._phase.train)

    StageScheduler.setup = setup
    StageScheduler.on_train_batch_start = phase_following_batch_start


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    flags = [arg for arg in argv[1:] if arg.startswith("--")]
    stage, *overrides = [arg for arg in argv[1:] if not arg.startswith("--")]
    if "--naive" in flags:
        _naive_freezing()
    inf_loss = next((tuple(map(int, f.split("=")[1].split(":"))) for f in flags if f.startswith("--inf-loss=")), None)
    seen: list[list[str]] = []
    weights: list[str] = []
    _record_batches(seen, weights, inf_loss)
    run = train(load_config(stage, overrides))
    groups = _full_groups(run.module.model.trainable_groups(), run.module.trainer.strategy.model)
    report = {
        "rank": run.module.global_rank,
        "world_size": run.module.trainer.world_size,
        "sha256": {group: _checksum(params) for group, params in groups.items()},
        "lora_b_max": max(p.abs().max().item() for name, p in groups["lora"].items() if "lora_B" in name),
        "batches": seen,
        "weights_by_step": weights,  # trained parameters at the start of each training step
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{report['rank']}.json").write_text(json.dumps(report))
    torch.save({n: p for params in groups.values() for n, p in params.items()}, out / f"rank{report['rank']}.pt")


def _full_groups(groups: dict, wrapped: torch.nn.Module) -> dict:
    """Copies of the trained groups' full tensors; under FSDP gathered from every rank's shard.

    FSDP puts each module whose parameters all train into a unit of its own (strategy.fsdp_wrap_policy), so
    gathering those leaf units one by one (a collective, in the same order on every rank) covers them all.
    (One summon_full_params over the whole model fails on CPU with torch 2.13 once units nest: "Trying to
    resize storage that is not resizable".)
    """
    copies = {group: {n: p.detach().clone() for n, p in params.items()} for group, params in groups.items()}
    if not isinstance(wrapped, FullyShardedDataParallel):
        return copies
    names = {id(p): (group, n) for group, params in groups.items() for n, p in params.items() if p.requires_grad}
    gathered = set()
    for unit in FullyShardedDataParallel.fsdp_modules(wrapped):
        if len(FullyShardedDataParallel.fsdp_modules(unit)) > 1:
            continue  # holds other units: its own parameters are frozen ones
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            for p in unit.parameters():
                if id(p) in names:
                    group, n = names[id(p)]
                    copies[group][n] = p.detach().clone()
                    gathered.add(id(p))
    assert gathered == set(names), f"{len(set(names) - gathered)} trained tensors outside a leaf FSDP unit"
    return copies


def _checksum(params: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    main(sys.argv[1:])
