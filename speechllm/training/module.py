"""SpeechLLMModule: the LightningModule. Owns the steps, the optimizer and what checkpoints hold."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from speechllm.data.dataset import Batch
from speechllm.evaluation.validation import ValidationAnswers
from speechllm.model.llm import decoder_layers
from speechllm.model.speech_llm import SpeechLLM, SpeechLLMOutput
from speechllm.training.checkpoints import META_KEY, CheckpointError, check_compatible, rng_states, set_rng_states
from speechllm.training.cpu_backward import without_onednn_on_cpu
from speechllm.training.stage_scheduler import StagePlan


class SpeechLLMModule(L.LightningModule):
    def __init__(self, cfg: DictConfig, plan: StagePlan, task_names: list[str]):
        super().__init__()
        self.cfg = cfg
        self.plan = plan
        self.task_names = list(task_names)
        self.model = SpeechLLM(cfg.model)
        # Read before any strategy wraps the model: under FSDP the parameters become flat shards.
        self._no_decay = {n for g in self.model.trainable_groups().values() for n, p in g.items() if p.ndim < 2}
        self._compiled = False
        # Checkpoints hold the groups this run trains or carries (saved_state_keys), nothing frozen;
        # on_load_checkpoint checks that they are all there.
        self.strict_loading = False
        # Groups init_from loaded that this run does not train (a stage training LoRA only keeps the audio path it
        # started from): its checkpoints hold them too, for a resume or a later stage's init_from.
        self.carried_groups: list[str] = []
        self.wandb_run_id: str | None = None
        self._val_sums: torch.Tensor | None = None
        self._val_answers: ValidationAnswers | None = None  # eval.generate: this validation's answers
        self._validations = 0
        self._resumed_rng: dict | None = None

    def setup(self, stage: str) -> None:
        # Before the strategy wraps the model; FSDP manages parameter dtypes itself.
        if not isinstance(self.trainer.strategy, FSDPStrategy):
            self.model.store_frozen_weights_for(self.trainer.precision, self.trainer.strategy.root_device)

    def configure_model(self) -> None:
        # After StageScheduler.setup and before the strategy wraps the model. In place (nn.Module.compile):
        # parameter names, hence checkpoints and FSDP units, stay as they are.
        if self.cfg.trainer.compile and not self._compiled:
            for layer in decoder_layers(self.model.llm):
                layer.compile()
            self._compiled = True

    def saved_state_keys(self, carried_groups: list[str] | None = None) -> set[str]:
        """What a checkpoint holds of the model: the groups this run trains and those it carries."""
        carried = self.carried_groups if carried_groups is None else carried_groups
        groups = self.model.trainable_groups()
        return {f"model.{name}" for group in {*self.plan.trained_groups, *carried} for name in groups[group]}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = self._loss(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch))
        return out.loss

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        with without_onednn_on_cpu(loss.device):  # oneDNN's conv backward is wrong on several CPU threads
            super().backward(loss, *args, **kwargs)

    def _loss(self, batch: Batch) -> SpeechLLMOutput:
        """Through the model's forward (what DDP/FSDP wrap), from waveforms or from cached features."""
        return self.model(batch.wave, batch.wave_mask, batch.instructions, batch.targets,
                          features=batch.features, feature_mask=batch.feature_mask)

    def on_validation_epoch_start(self) -> None:
        # Per task: [sum of token losses, number of target tokens]; reduced across ranks at the end.
        self._val_sums = torch.zeros(len(self.task_names), 2, device=self.device, dtype=torch.float64)
        self._validations += 1
        if self.cfg.eval.generate and (self._validations - 1) % self.cfg.eval.generate_every_n_validations == 0:
            self._val_answers = ValidationAnswers(self.cfg, self.plan.tasks)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        out = self._loss(batch)
        for task, loss, tokens in zip(batch.tasks, out.example_losses, out.target_tokens):
            row = self._val_sums[self.task_names.index(task)]
            row[0] += loss.double() * tokens
            row[1] += tokens
        if self._val_answers is not None:
            self._val_answers.add(self.model, batch)

    def on_validation_epoch_end(self) -> None:
        if self._val_answers is not None:
            self._val_answers.finish(self)
            self._val_answers = None
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        present = sums[:, 1] > 0
        if not present.any():
            return
        self.log("val/loss", (sums[present, 0].sum() / sums[present, 1].sum()).float(), prog_bar=True)
        for task, (loss_sum, tokens) in zip(self.task_names, sums.tolist()):
            if tokens:
                self.log(f"val/loss/{task}", loss_sum / tokens)

    def configure_optimizers(self):
        groups = self.model.trainable_groups()
        param_groups, lambdas = [], []
        for group in self.plan.trained_groups:
            params = groups[group].items()
            # No weight decay on scalars and vectors (layer weights, biases), as usual for AdamW.
            decayed = [p for n, p in params if n not in self._no_decay]
            for name, decay, members in ((group, self.cfg.optim.weight_decay, decayed),
                                         (f"{group}/no_decay", 0.0, [p for n, p in params if n in self._no_decay])):
                if members:
                    param_groups.append({"params": members, "lr": 1.0, "weight_decay": decay, "name": name})
                    lambdas.append(self.plan.lr_lambda(group))
        optim = self.cfg.optim
        optimizer = torch.optim.AdamW(param_groups, betas=tuple(optim.betas), eps=optim.eps)
        # Base lr 1.0: the lambda returns the absolute learning rate of the group at each step.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning cannot clip by norm under FSDP: the norm spans every rank's shards, which FSDP's own
            # clip_grad_norm_ (a collective, on the root unit) computes. Gated groups have no gradient here.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.saved_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[META_KEY] = {
            "stage": self.plan.stage,
            "phase": self.plan.phase_at(self.global_step).name,
            "global_step": self.global_step,
            "model_config": OmegaConf.to_container(self.cfg.model),
            "trained_groups": self.plan.trained_groups,
            "carried_groups": self.carried_groups,
            "wandb_run_id": self.wandb_run_id,
            # One entry per rank (dropout must continue where it stopped on each); every rank gets here,
            # as Lightning builds the checkpoint on all ranks and writes it on rank 0.
            "rng_states": _all_ranks(rng_states()),
        }

    def check_saved_tensors(self, checkpoint: dict, path: Path) -> None:
        """A checkpoint to resume from must hold every tensor this run trains or carries (strict_loading is off)."""
        missing = self.saved_state_keys(checkpoint[META_KEY].get("carried_groups", [])) - set(checkpoint["state_dict"])
        if missing:
            raise CheckpointError(
                f"{path}: lacks {len(missing)} tensors this run trains or carries (e.g. {sorted(missing)[0]}); "
                "use init_from for a checkpoint of another stage"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainer = self._trainer
        path = Path(trainer.ckpt_path) if trainer and trainer.ckpt_path else Path("checkpoint")
        check_compatible(checkpoint, self.cfg.model, path)
        # A resume does not load init_from again: the checkpoint holds what the run carries from it.
        self.carried_groups = list(checkpoint[META_KEY].get("carried_groups", []))
        if "state_dict" in checkpoint:  # FSDP loads it into the shards before this hook (and checks it then)
            self.check_saved_tensors(checkpoint, path)
        states = checkpoint[META_KEY].get("rng_states") or []
        world_size = trainer.world_size if trainer else 1
        if len(states) == world_size:
            self._resumed_rng = states[self.global_rank]
        else:
            rank_zero_warn(
                f"{path}: saved by {len(states)} process(es), resumed on {world_size}; random streams start afresh"
            )

    def on_train_start(self) -> None:
        # Lightning keeps each submodule's mode, and `from_pretrained` LLMs arrive in eval mode: without
        # this, LoRA dropout would be off for real models (the encoder stays in eval mode regardless).
        self.model.train()
        # Restored here, not when the checkpoint is read: between the two, setting up the run draws from
        # the global RNG in ways an uninterrupted run did not at this step.
        if self._resumed_rng is not None:
            set_rng_states(self._resumed_rng)
            self._resumed_rng = None


def _all_ranks(value):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
