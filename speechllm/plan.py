"""`speechllm plan`: parameters and per-device GPU memory of a model, built on the meta device (no weights).

The model is the same SpeechLLM that training builds, from the preset's `architecture` values alone:
`pretrained` is ignored (nothing is downloaded), the tokenizer is replaced by the file-less byte-level one
(the vocabulary size comes from the architecture), and every tensor lives on PyTorch's meta device, so
a 8B-parameter model is built in seconds without memory.

Memory per device is an estimate (README, "Real models and planning"):

- weights: frozen parameters in the 16-bit compute dtype under mixed precision (fp32 under 32-true);
  trainable parameters in fp32 with fp32 gradients and AdamW's two fp32 states (16 bytes per parameter);
  DDP keeps a second gradient copy in its all-reduce buckets.
- FSDP (full shard over N devices): weights, gradients and optimizer states divided by N, plus the
  parameters gathered to compute: the root unit (everything outside the repeated transformer blocks:
  embeddings, LM head, encoder front end, downsampler, projection) stays gathered for the whole step, and
  two blocks are gathered at a time (the one computing and the one prefetched).
- activations (not sharded; per device batch): what autograd saves for the backward pass through the frozen
  LLM to the projection (counted tensor by tensor for Llama/Qwen-style and T5 blocks; inputs of frozen linear
  layers are not saved), the LoRA adapters' inputs, the downsampler's, the stacked encoder hidden states the
  layer weights need, the logits with their fp32 log-softmax, and the encoder's forward without autograd
  (all its hidden states plus one layer's working set).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from speechllm.config import TRAINABLE_GROUPS, ConfigError, ModelConfig, load_config

GIB = 1024**3
PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true", "32-true")
MODEL_SECTIONS = {f.name for f in dataclasses.fields(ModelConfig)}
PARAMETER_GROUPS = ("encoder", "layer_weights", "downsampler", "projection", "llm", "lora")


@dataclass(frozen=True)
class Workload:
    """What one optimizer step of one device processes, and how."""

    batch_size: int = 8
    """Examples per device."""
    seconds: float = 30.0
    """Audio per example (the longest clip of a batch; data.max_duration defaults to 30 s)."""
    prompt_tokens: int = 48
    """Text positions besides the audio and the target: chat template, instruction, answer prefix."""
    target_tokens: int = 96
    """Answer positions (a 30 s transcript is about 80 words)."""
    devices: int = 8
    precision: str = "bf16-mixed"
    gradient_checkpointing: bool = False
    """Each LLM block keeps only its input and is recomputed in the backward pass."""

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision: '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.seconds <= 0 or self.batch_size < 1 or self.devices < 1 or min(self.prompt_tokens, self.target_tokens) < 0:
            raise ConfigError("plan: --seconds, --batch-size and --devices must be positive, token counts >= 0")


@dataclass(frozen=True)
class Bytes:
    """Bytes per element: frozen weights, activations, trainable weights, their gradients, AdamW states."""

    frozen: int
    activation: int
    trainable: int
    gradient: int
    optimizer: int

    @classmethod
    def of(cls, precision: str) -> "Bytes":
        if precision == "32-true":
            return cls(4, 4, 4, 4, 8)
        if precision == "bf16-true":  # everything in bf16, AdamW states too
            return cls(2, 2, 2, 2, 4)
        return cls(2, 2, 4, 4, 8)  # *-mixed: frozen parts stored in the autocast dtype, trained ones fp32


@dataclass
class Plan:
    source: str
    workload: Workload
    parameters: dict[str, int]
    """Group -> parameter count (encoder, layer_weights, downsampler, projection, llm, lora)."""
    trained_groups: list[str]
    sequence: dict[str, int]
    """Per example: encoder_frames, audio_positions, and llm_positions (or llm_encoder/llm_decoder_positions)."""
    activations: dict[str, int]
    """Per device, bytes: the components and `peak`."""
    memory: dict[str, dict[str, int]]
    """Strategy (ddp, fsdp) -> item -> bytes per device, with `total`."""
    pretrained: dict[str, str | None] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    @property
    def trainable_parameters(self) -> int:
        return sum(self.parameters[g] for g in self.trained_groups)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "workload": dataclasses.asdict(self.workload),
            "parameters": {**self.parameters, "total": self.total_parameters, "trainable": self.trainable_parameters},
            "trained_groups": self.trained_groups,
            "pretrained": self.pretrained,
            "sequence": self.sequence,
            "activations_bytes": self.activations,
            "memory_bytes": self.memory,
            "assumptions": self.assumptions,
        }


def make_plan(target: str, overrides: list[str] = (), workload: Workload = Workload()) -> Plan:
    cfg, trained, source = load_plan_config(target, overrides)
    checkpointing = workload.gradient_checkpointing or bool(cfg.model.llm.get("gradient_checkpointing", False))
    workload = dataclasses.replace(workload, gradient_checkpointing=checkpointing)
    model = build_on_meta(cfg.model)
    parameters = count_parameters(model)
    if not parameters["lora"]:
        trained = [g for g in trained if g != "lora"]
    sequence = sequence_lengths(model, workload)
    activations = activation_bytes(model, cfg.model, trained, workload, sequence)
    memory = {
        "ddp": state_bytes(model, trained, workload, sharded=False),
        "fsdp": state_bytes(model, trained, workload, sharded=True),
    }
    for item in memory.values():
        item["activations"] = activations["peak"]
        item["total"] = sum(item.values())
    return Plan(
        source=source,
        workload=workload,
        parameters=parameters,
        trained_groups=trained,
        sequence=sequence,
        activations=activations,
        memory=memory,
        pretrained={"encoder": cfg.model.encoder.pretrained, "llm": cfg.model.llm.pretrained},
        assumptions=assumptions(model, cfg.model, workload),
    )


def load_plan_config(target: str, overrides: list[str] = ()) -> tuple[DictConfig, list[str], str]:
    """A model preset (a name in configs/model/ or a YAML of model sections) or a stage file.

    -> (run config, groups that train, description). A model preset trains every group (as stage 2 does);
    a stage file trains the groups its phases name.
    """
    path = Path(target)
    is_model_preset = not target.endswith((".yaml", ".yml")) or (path.is_file() and _holds_model_sections(path))
    if is_model_preset:
        cfg = load_config(None, [f"presets.model={target}", *overrides])
        return cfg, list(TRAINABLE_GROUPS), f"model preset {target}"
    from speechllm.training.stage_scheduler import StagePlan

    cfg = load_config(target, overrides)
    return cfg, StagePlan(cfg).trained_groups, f"{target} (model preset {cfg.presets.model})"


def _holds_model_sections(path: Path) -> bool:
    keys = set(OmegaConf.load(path).keys()) if path.stat().st_size else set()
    return bool(keys) and keys <= MODEL_SECTIONS


def build_on_meta(model_cfg: ModelConfig | DictConfig) -> nn.Module:
    """The SpeechLLM of `model_cfg` built from its architecture values on the meta device: no hub, no weights."""
    from speechllm.model.speech_llm import SpeechLLM

    cfg = OmegaConf.to_object(model_cfg) if isinstance(model_cfg, DictConfig) else copy.deepcopy(model_cfg)
    if "model_type" not in cfg.llm.architecture:
        raise ConfigError(
            "model.llm.architecture: needs model_type and the model's config values to be planned without the hub "
            "(see configs/model/whisper_large_v3_qwen2_7b.yaml)"
        )
    if cfg.encoder.pretrained and not cfg.encoder.architecture:
        raise ConfigError("model.encoder.architecture: write the encoder's config values to plan it without the hub")
    cfg.encoder.pretrained = cfg.llm.pretrained = None
    cfg.llm.tokenizer = "byt5"  # needs no files; parameter counts do not depend on it
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", FutureWarning)
        return SpeechLLM(cfg)


def count_parameters(model: nn.Module) -> dict[str, int]:
    groups = {name: _numel(params.values()) for name, params in model.trainable_groups().items()}
    return {
        "encoder": _numel(model.encoder.parameters()),
        "layer_weights": groups["layer_weights"],
        "downsampler": groups["downsampler"],
        "projection": groups["projection"],
        "llm": _numel(model.llm.parameters()) - groups["lora"],
        "lora": groups["lora"],
    }


def lora_parameters_expected(model: nn.Module) -> int:
    """r * (in_features + out_features) per adapted linear layer: LoRA's A (r x in) and B (out x r)."""
    return sum(r * (m.in_features + m.out_features) for _, m, r, _ in _lora_layers(model))


def sequence_lengths(model: nn.Module, workload: Workload) -> dict[str, int]:
    encoder = model.encoder
    samples = round(workload.seconds * encoder.sample_rate)
    if encoder.kind == "whisper":
        window = encoder.model.config.max_source_positions
        if samples > encoder._mel.num_samples:
            raise ConfigError(f"--seconds {workload.seconds:g}: longer than the Whisper window ({window // 50} s)")
        frames, valid = window, min((samples // 160 + 1) // 2, window)  # every clip is padded to the window
    else:
        frames = valid = int(encoder.model._get_feat_extract_output_lengths(torch.tensor(samples)))
    audio = int(model.downsampler.output_lengths(torch.tensor(valid)))
    sequence = {"encoder_frames": frames, "audio_positions": audio}
    if model.is_seq2seq:
        sequence["llm_encoder_positions"] = audio + workload.prompt_tokens
        sequence["llm_decoder_positions"] = workload.target_tokens + 1  # + eos
    else:
        sequence["llm_positions"] = audio + workload.prompt_tokens + workload.target_tokens + 1
    return sequence


def activation_bytes(model, model_cfg, trained: list[str], workload: Workload, sequence: dict[str, int]) -> dict:
    """Activation memory per device (bytes): each component, and the peak of the step."""
    a = Bytes.of(workload.precision).activation
    batch = workload.batch_size
    encoder_hidden = _encoder_hidden_bytes(model, sequence, a)
    stacks = _llm_stacks(model, model_cfg, trained, sequence, a)
    if workload.gradient_checkpointing:
        llm = sum(n * layer_input for n, _, layer_input in stacks) + max(per_layer for _, per_layer, _ in stacks)
    else:
        llm = sum(n * per_layer for n, per_layer, _ in stacks)
    parts = {
        "encoder_forward": batch * (2 * encoder_hidden + _encoder_layer_bytes(model, sequence, a)),
        "encoder_hidden_states": batch * encoder_hidden,
        "adapter": batch * _adapter_bytes(model, sequence, a),
        "llm_layers": batch * llm,
        "logits": _logits_bytes(model, model_cfg, workload, a),
    }
    # The encoder runs (no autograd) before anything else is saved; its stacked hidden states then stay for
    # the layer weights' backward while the rest of the forward saves its tensors.
    training = parts["encoder_hidden_states"] + parts["adapter"] + parts["llm_layers"] + parts["logits"]
    return {**parts, "peak": max(parts["encoder_forward"], training)}


def state_bytes(model: nn.Module, trained: list[str], workload: Workload, sharded: bool) -> dict[str, int]:
    """Weights, gradients and optimizer states per device: replicated (DDP) or fully sharded (FSDP)."""
    b = Bytes.of(workload.precision)
    trained_ids = {id(p) for g in trained for p in model.trainable_groups()[g].values()}
    n_trained = _numel(p for p in _unique_parameters(model) if id(p) in trained_ids)
    n_frozen = _numel(_unique_parameters(model)) - n_trained
    shards = workload.devices if sharded else 1
    item = {
        "frozen_weights": n_frozen * b.frozen // shards,
        "trainable_weights": n_trained * b.trainable // shards,
        # DDP all-reduces through buckets that hold a second copy of the gradients.
        "gradients": n_trained * b.gradient * (1 if sharded else 2) // shards,
        "optimizer_states": n_trained * b.optimizer // shards,
    }
    if sharded:
        item["gathered_weights"] = _gathered_bytes(model, trained_ids, b)
    return item


def assumptions(model, model_cfg, workload: Workload) -> list[str]:
    b = Bytes.of(workload.precision)
    attention = model_cfg.llm.get("attn_implementation", "sdpa")
    chunk = model_cfg.llm.get("loss_chunk_tokens", 0)
    eager_encoder = model.encoder.model.config._attn_implementation == "eager"
    return [
        f"{workload.precision}: frozen weights {b.frozen} B/parameter; trained ones {b.trainable} B + gradients "
        f"{b.gradient} B + AdamW {b.optimizer} B; activations {b.activation} B/element",
        "DDP: every device holds every weight, plus a bucket copy of the gradients for the all-reduce",
        f"FSDP: full shard over {workload.devices} devices; the root unit (all but the transformer blocks) stays "
        "gathered, and two blocks are gathered at a time",
        f"LLM attention: {attention} "
        + ("(scores and fp32 probabilities saved per block)" if attention == "eager"
           else "(no position x position scores saved, except T5's position bias)"),
        "encoder: no autograd, one layer at a time"
        + (" (eager attention: bias, gated bias, scores, probabilities, heads x frames^2 each)" if eager_encoder else ""),
        "logits + loss: at the target positions (+ eos) only, "
        + (f"{chunk} at a time (model.llm.loss_chunk_tokens)" if chunk
           else "all at once (model.llm.loss_chunk_tokens=N: N at a time)"),
        "activation peak: the encoder forward or the other activation rows together, whichever is larger",
        "gradient checkpointing: " + ("on, each LLM block keeps only its input" if workload.gradient_checkpointing
                                      else "off (--gradient-checkpointing: each LLM block keeps only its input)"),
        "not included: CUDA context and kernels' workspaces (~1 GiB), allocator fragmentation, the batch itself",
    ]


# --- activation components (bytes per example) ---


def _encoder_hidden_bytes(model, sequence, a) -> int:
    """All hidden states, stacked (L+1, F, D): the layer weights' backward needs them."""
    return model.encoder.num_layers * sequence["encoder_frames"] * model.encoder.hidden_size * a


def _encoder_layer_bytes(model, sequence, a) -> int:
    """One encoder layer's working set without autograd: FFN in and out, a few hidden-size tensors, and for
    eager attention (WavLM) its relative position bias, gated bias, scores and probabilities (heads x F x F)."""
    config, frames = model.encoder.model.config, sequence["encoder_frames"]
    if model.encoder.kind == "whisper":
        ffn, heads = config.encoder_ffn_dim, config.encoder_attention_heads
    else:
        ffn, heads = config.intermediate_size, config.num_attention_heads
    working = frames * (2 * ffn + 4 * model.encoder.hidden_size) * a
    if config._attn_implementation == "eager":
        working += 4 * heads * frames * frames * a
    return working


def _adapter_bytes(model, sequence, a) -> int:
    """Downsampler convs (input and pre-GELU output each) and the projection (input and output)."""
    frames = torch.tensor(sequence["encoder_frames"])
    total, width = 0, model.encoder.hidden_size
    for conv in model.downsampler.convs:
        shorter = model.downsampler._conv_length(frames)
        total += int(frames) * width + int(shorter) * conv.out_channels
        frames, width = shorter, conv.out_channels
    return (total + int(frames) * (width + model.projection.out_features)) * a


def _logits_bytes(model, model_cfg, workload: Workload, a) -> int:
    """Logits in the compute dtype, their fp32 copy for the loss and the saved fp32 log-softmax, for the target
    positions (+ eos) alone: decoder-only LLMs compute none over audio and prompt. With
    model.llm.loss_chunk_tokens, those of one chunk (computed in the loss, and again in its backward pass)."""
    rows = workload.batch_size * (workload.target_tokens + 1)
    chunk = model_cfg.llm.get("loss_chunk_tokens", 0)
    if chunk:
        rows = min(rows, chunk)
    vocab = model.llm.get_output_embeddings().out_features
    return rows * vocab * (a + (4 if a < 4 else 0) + 4)


def _llm_stacks(model, model_cfg, trained, sequence, a) -> list[tuple[int, int, int]]:
    """(layers, saved bytes per layer, layer input bytes) per stack of blocks, per example, LoRA included."""
    from speechllm.model.llm import base_llm

    config = base_llm(model.llm).config
    lora = _lora_bytes_per_stack(model, sequence, a) if "lora" in trained else {}
    eager = model_cfg.llm.get("attn_implementation", "sdpa") == "eager"
    if model.is_seq2seq:
        return _t5_stacks(config, sequence, a, lora, eager)
    return [_decoder_stack(config, sequence["llm_positions"], a, lora.get("decoder", 0), eager)]


def _decoder_stack(config, positions, a, lora, eager) -> tuple[int, int, int]:
    """A Llama/Qwen-style block (RMSNorm, GQA attention, SwiGLU MLP) in saved elements per position:
    two norm inputs (kept in fp32 by the norms' upcast), q, k, v and the attention output (SDPA),
    the MLP's gate and up outputs and the activation's output (3 x intermediate)."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    per_position = 2 * 4 * h + a * (heads * head_dim * 2 + 2 * kv) + a * 3 * config.intermediate_size
    per_layer = positions * per_position + lora
    if eager:
        per_layer += heads * positions * positions * (4 + a)
    return config.num_hidden_layers, per_layer, positions * h * a


def _t5_stacks(config, sequence, a, lora, eager) -> list[tuple[int, int, int]]:
    """T5 blocks in saved elements per position (measured against autograd): norm inputs in the input dtype
    and fp32; q, k, v, attention output; the position bias SDPA keeps per layer (heads x keys); gated-gelu's
    six d_ff tensors (gelu_new is computed in Python); dropout masks (1 byte each) when dropout_rate > 0."""
    h, inner, heads, ffn = config.d_model, config.num_heads * config.d_kv, config.num_heads, config.d_ff
    enc, dec = sequence["llm_encoder_positions"], sequence["llm_decoder_positions"]
    norm = 4 + a if a < 4 else 4
    mlp = (6 if config.is_gated_act else 2) * ffn * a
    dropout = config.dropout_rate > 0
    encoder = enc * (2 * norm * h + 4 * inner * a + heads * enc * a + mlp + dropout * (2 * h + ffn))
    decoder = dec * (3 * norm * h + 6 * inner * a + heads * (dec + enc) * a + mlp + dropout * (3 * h + ffn))
    decoder += enc * 2 * inner * a  # cross-attention keys and values of the encoder positions
    if eager:
        encoder += heads * enc * enc * (4 + a)
        decoder += heads * dec * (dec + enc) * (4 + a)
    return [
        (config.num_layers, encoder + lora.get("encoder", 0), enc * h * a),
        (config.num_decoder_layers, decoder + lora.get("decoder", 0), dec * h * a),
    ]


def _lora_bytes_per_stack(model, sequence, a) -> dict[str, int]:
    """Per layer of each stack: each adapted linear saves its (dropped-out) input for A, a 1-byte dropout mask,
    and A's output for B (an upper bound when adapters share an input without dropout)."""
    totals, layers = {}, {}
    for name, module, r, dropout in _lora_layers(model):
        stack = _lora_stack(model, name)
        positions = _lora_positions(model, name, stack, sequence)
        saved = positions * ((module.in_features + r) * a + (module.in_features if dropout else 0))
        totals[stack] = totals.get(stack, 0) + saved
        layers.setdefault(stack, set()).add(_layer_index(name))
    return {stack: total // max(len(layers[stack]), 1) for stack, total in totals.items()}


def _lora_stack(model, name) -> str:
    return "encoder" if model.is_seq2seq and ".encoder." in f".{name}" else "decoder"


def _lora_positions(model, name, stack, sequence) -> int:
    if not model.is_seq2seq:
        return sequence["llm_positions"]
    if stack == "encoder" or ("EncDecAttention" in name and name.rsplit(".", 1)[-1] in ("k", "v")):
        return sequence["llm_encoder_positions"]  # encoder blocks, and cross-attention keys/values
    return sequence["llm_decoder_positions"]


def _layer_index(name: str) -> str:
    """The block a module belongs to: the name up to the first number (layers.3, block.3)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    for name, module in model.llm.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            dropout = not isinstance(module.lora_dropout["default"], nn.Identity)
            yield name, module, module.r["default"], dropout


# --- FSDP units ---


def _gathered_bytes(model: nn.Module, trained_ids: set[int], b: Bytes) -> int:
    """Unsharded parameters FSDP holds at once: the root unit for the whole step, plus two blocks."""
    blocks = _repeated_blocks(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}

    def size(params) -> int:
        return sum(p.numel() * (b.trainable if id(p) in trained_ids else b.frozen) for p in params)

    root = size(p for p in _unique_parameters(model) if id(p) not in in_blocks)
    largest = max((size(_unique_parameters(block)) for block in blocks), default=0)
    return root + 2 * largest


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules held in a ModuleList of same-class modules with parameters: transformer layers
    (and the encoder's conv front-end layers), the units an FSDP auto-wrap policy shards one by one."""
    blocks, inside = [], set()
    for _, module in model.named_modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) == 1 and any(True for _ in module[0].parameters()):
            blocks.extend(module)
            inside.update(id(m) for block in module for m in block.modules())
    return blocks


def _unique_parameters(module: nn.Module):
    return list(module.parameters())  # nn.Module.parameters() already yields a tied weight once


def _numel(params) -> int:
    return sum(p.numel() for p in params)


# --- output ---


def print_plan(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    w = plan.workload
    console.print(f"[bold]speechllm plan[/bold]: {plan.source}, built on the meta device (no weights loaded)")

    params = Table(title="Parameters", title_justify="left")
    for column, justify in (("group", "left"), ("parameters", "right"), ("", "right"), ("trains", "center"), ("", "left")):
        params.add_column(column, justify=justify)
    sources = {"encoder": plan.pretrained.get("encoder"), "llm": plan.pretrained.get("llm")}
    for group in PARAMETER_GROUPS:
        count = plan.parameters[group]
        trains = "yes" if group in plan.trained_groups else "-"
        note = f"frozen, {sources[group]}" if sources.get(group) else ("frozen" if group in sources else "")
        label = "llm (base)" if group == "llm" else group
        params.add_row(label, f"{count:,}", _short(count), trains, note)
    params.add_section()
    params.add_row("total", f"{plan.total_parameters:,}", _short(plan.total_parameters), "", "")
    share = plan.trainable_parameters / plan.total_parameters
    params.add_row("trainable", f"{plan.trainable_parameters:,}", _short(plan.trainable_parameters), "", f"{share:.2%}")
    console.print(params)

    console.print(_workload_line(plan))
    memory = Table(title=f"Estimated memory per device (GiB) at batch {w.batch_size} per device", title_justify="left")
    memory.add_column("")
    memory.add_column("DDP", justify="right")
    memory.add_column(f"FSDP ({w.devices} devices)", justify="right")
    ddp, fsdp = plan.memory["ddp"], plan.memory["fsdp"]
    rows = (("frozen weights", "frozen_weights"), ("trainable weights", "trainable_weights"),
            ("gradients", "gradients"), ("AdamW states", "optimizer_states"), ("FSDP gathered weights", "gathered_weights"))
    for label, key in rows:
        memory.add_row(label, _gib(ddp.get(key)), _gib(fsdp.get(key)))
    memory.add_row("activations (peak)", _gib(ddp["activations"]), _gib(fsdp["activations"]))
    act = plan.activations
    components = (("encoder forward, no grad", "encoder_forward"), ("encoder hidden states", "encoder_hidden_states"),
                  ("downsampler + projection", "adapter"), ("LLM blocks (+ LoRA)", "llm_layers"), ("logits + loss", "logits"))
    for label, key in components:
        memory.add_row(f"  {label}", _gib(act[key]), _gib(act[key]), style="dim")
    memory.add_section()
    memory.add_row("total", _gib(ddp["total"]), _gib(fsdp["total"]), style="bold")
    console.print(memory)
    console.print("Assumptions:")
    for line in plan.assumptions:
        console.print(f"  - {line}", highlight=False)


def _workload_line(plan: Plan) -> str:
    w, s = plan.workload, plan.sequence
    if "llm_positions" in s:
        llm = (f"{s['llm_positions']} LLM positions ({s['audio_positions']} audio + {w.prompt_tokens} prompt + "
               f"{w.target_tokens + 1} target)")
    else:
        llm = (f"LLM encoder {s['llm_encoder_positions']} positions ({s['audio_positions']} audio + {w.prompt_tokens} "
               f"instruction), decoder {s['llm_decoder_positions']}")
    return (f"Workload: {w.batch_size} x {w.seconds:g} s audio per device -> {s['encoder_frames']} encoder frames -> "
            f"{llm}; {w.precision}; {w.devices} devices")


def _short(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def _gib(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f}" if value >= GIB / 100 or value == 0 else "<0.01"
