"""How a run spreads over devices: Lightning's DDP, or FSDP set up for a frozen model with small trained parts.

DDP replicates the whole model on every rank. FSDP shards it: each LLM decoder layer is one FSDP unit
(gathered just before it runs, freed after), and so is every small module whose parameters all train (the
projection's linear map and norm, the downsampler's convs, the layer weights, each LoRA A and B), so that
the big units hold frozen weights only and gradients are reduced for trained parameters only (peft's
recipe for LoRA under FSDP). The rest, the frozen encoder included, forms the root unit. The encoder is
deliberately not split into units: with the feature cache it runs on some steps and ranks but not on
others, and FSDP units must run on every rank alike.

`use_orig_params=True` keeps the model's own parameters, so requires_grad may differ inside a unit, the
StageScheduler's groups and the optimizer's param groups stay what they are without FSDP, and checkpoint
keys keep their names. The StageScheduler fixes requires_grad in `setup`, before Lightning wraps the model
in `strategy.setup`; the auto-wrap policy reads those flags then.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig
from torch import nn
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import CustomPolicy

from speechllm.model.llm import decoder_layers
from speechllm.model.speech_llm import SpeechLLM


def build_strategy(trainer_cfg: DictConfig, model: SpeechLLM) -> str | FSDPStrategy:
    """`trainer.strategy` as Lightning takes it: a name (auto, ddp) or the FSDP strategy for this model."""
    if trainer_cfg.strategy != "fsdp":
        return trainer_cfg.strategy
    return SpeechFSDPStrategy(
        auto_wrap_policy=fsdp_wrap_policy(model),
        sharding_strategy=trainer_cfg.fsdp.sharding_strategy,
        cpu_offload=trainer_cfg.fsdp.cpu_offload,
        use_orig_params=True,
        # One file holding the trained groups only (module.on_save_checkpoint); a sharded checkpoint would be
        # a directory of every weight, frozen ones included.
        state_dict_type="full",
    )


def fsdp_wrap_policy(model: SpeechLLM) -> CustomPolicy:
    layer_classes = tuple({type(layer) for layer in decoder_layers(model.llm)})

    def own_unit(module: nn.Module) -> bool:
        if isinstance(module, layer_classes):
            return True
        params = list(module.parameters(recurse=False))
        return bool(params) and all(p.requires_grad for p in params)  # evaluated after StageScheduler.setup

    return CustomPolicy(own_unit)


class SpeechFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with checkpoints in the same format as without FSDP, and usable on CPU.

    Checkpoints: one file (Lightning's "full" state dict) whose optimizer state is keyed as any optimizer keys
    it (by position in its param groups), not by position among the model's parameters as Lightning's FSDP
    keys it, so that a run resumes under FSDP from a DDP or single-device checkpoint and back. Before loading,
    the tensors this run trains or carries are checked to be there (module.check_saved_tensors).

    CPU (gloo), where the tests run it: torch's FSDP runs there when given the device, but Lightning refuses
    `strategy="fsdp"` with a CPU accelerator (a check on the exact FSDPStrategy class), passes FSDP
    `device_id=None` (torch then looks for a GPU) and gathers state dicts with `offload_to_cpu=True`, which on
    CPU frees the tensors it returns (the process dies of a segfault). On CPU this class passes the device and
    gathers in place; on GPUs it gathers to host memory as Lightning does.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        return FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )

    def lightning_module_state_dict(self) -> dict:
        with self._full_state_dict(rank0_only=True):
            return self.model.state_dict()  # empty on ranks other than 0

    def optimizer_state(self, optimizer) -> dict:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        with self._full_state_dict(rank0_only=True):
            state = FSDP.optim_state_dict(self.model, optimizer)  # keyed by parameter name
        if self.global_rank != 0:
            return state
        return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model, optim=optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():  # a sharded checkpoint directory: not what this strategy writes
            return super().load_checkpoint(path, weights_only)
        checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
        # Loaded into the shards here, before the module's on_load_checkpoint could see the state dict.
        self.lightning_module.check_saved_tensors(checkpoint, path)
        with self._full_state_dict(rank0_only=False):
            self.model.load_state_dict(checkpoint.pop("state_dict"), strict=False)  # frozen weights are not in it
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING and checkpoint.get("optimizer_states"):
                for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model, optim=optimizer)
                    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, state))
        return checkpoint

    def _full_state_dict(self, rank0_only: bool):
        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        )
