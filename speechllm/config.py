"""Structured run configuration: dataclass schema, composition of YAML files and overrides, validation.

Precedence (later wins): dataclass defaults < presets (`configs/<kind>/<name>.yaml`) < stage file
(`stages/*.yaml`) < command-line `key=value` overrides. Every source is merged into the typed schema
on its own, so an unknown key or a wrong type is reported with the file (or "command line") it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TRAINABLE_GROUPS = ("layer_weights", "downsampler", "projection", "lora")
ENCODER_KINDS = ("wavlm", "hubert", "wav2vec2", "whisper")
LLM_KINDS = ("causal", "seq2seq")
WER_NORMALIZATION_STEPS = ("lower", "punct", "whitespace")
INSTRUCTION_SETS = ("seen", "heldout", "both")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


class ConfigError(ValueError):
    """A configuration mistake, reported as one line naming the source and the key."""


@dataclass
class EncoderConfig:
    kind: str = "wavlm"
    """Encoder family: wavlm | hubert | wav2vec2 | whisper."""
    pretrained: Optional[str] = None
    """HF hub name or local directory for `from_pretrained`; None builds from `architecture` (random init)."""
    architecture: Dict[str, Any] = field(default_factory=dict)
    """HF config fields for `from_config` (tiny presets) or overrides on top of the pretrained config."""
    sample_rate: int = 16000
    normalize_waveform: bool = True
    """Zero-mean unit-variance per utterance (the wav2vec2-family feature extractor's do_normalize)."""


@dataclass
class LayerWeightsConfig:
    normalization: str = "softmax"
    """softmax: weights are softmax-normalised; mean: the paper's (1/L)·Σ w_l·h_l with raw weights."""


@dataclass
class DownsamplerConfig:
    num_layers: int = 2
    """Conv1d layers; the sequence shortens by stride**num_layers (default 4x: 50 Hz -> 12.5 Hz)."""
    kernel_size: int = 3
    stride: int = 2
    channels: int = 512


@dataclass
class LLMConfig:
    kind: str = "causal"
    """causal (decoder-only: Qwen2, Llama, ...) or seq2seq (encoder-decoder: T5, Flan-T5)."""
    pretrained: Optional[str] = None
    """HF hub name or local directory; None builds from `architecture` (random init)."""
    architecture: Dict[str, Any] = field(default_factory=dict)
    """HF config fields for `from_config`; must contain `model_type` when `pretrained` is None."""
    tokenizer: Optional[str] = None
    """`byt5` (byte-level, needs no files), a hub name or a local directory; None uses `pretrained`."""
    prompt_prefix: str = ""
    """Text before the audio embeddings (decoder-only), e.g. a chat template's user-turn opening."""
    answer_prefix: str = "\n"
    """Text between the instruction and the answer (decoder-only), e.g. the assistant-turn opening."""
    attn_implementation: str = "sdpa"
    """LLM attention kernel: sdpa (PyTorch's fused attention) | eager | flash_attention_2 / flash_attention_3
    (GPU, needs the flash-attn package) | flex_attention."""
    gradient_checkpointing: bool = False
    """Recompute each LLM layer's activations during the backward pass instead of keeping them (HF activation
    checkpointing, non-reentrant): much less activation memory for about a third more LLM compute."""
    loss_chunk_tokens: int = 0
    """Decoder-only: run the LM head and the loss over at most this many target tokens at a time and recompute
    each chunk's logits in the backward pass, so that a step never holds the (target tokens x vocabulary)
    logits, their fp32 copy and gradient (GiBs at a 150k vocabulary); 0 computes them all at once."""


@dataclass
class LoRAConfig:
    rank: int = 8
    """LoRA rank; 0 builds the model without adapters."""
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names to adapt (Qwen2/Llama: q_proj, v_proj; T5: q, v)."""


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    layer_weights: LayerWeightsConfig = field(default_factory=LayerWeightsConfig)
    downsampler: DownsamplerConfig = field(default_factory=DownsamplerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DataConfig:
    train_manifests: List[str] = field(default_factory=list)
    dev_manifests: List[str] = field(default_factory=list)
    task_files: List[str] = field(default_factory=list)
    """YAML files registering extra tasks (see README, "Your own task")."""
    max_batch_seconds: float = 60.0
    """Dynamic batches: total audio seconds per batch (per device)."""
    max_batch_size: Optional[int] = None
    max_batch_tokens: Optional[int] = None
    """Dynamic batches: LLM positions per batch (audio embeddings + longest instruction + target)."""
    max_duration: float = 30.0
    """Examples longer than this (seconds) are bad rows."""
    transcripts_as_asr: bool = False
    """Each training clip of another task whose row carries a `transcript` field is also an ASR example (the
    transcript, lowercase without punctuation, as target): ASR, and so stage 1's alignment, then covers the
    words that only the other tasks' clips say (README, "Transcripts as ASR examples")."""
    num_buckets: int = 10
    num_workers: int = 2
    on_bad_example: str = "error"
    """error: stop before training and list the bad rows; skip: drop them, count and list them. The same
    applies to an audio file that turns unreadable during training (README, "Reliability")."""
    max_dev_examples: Optional[int] = None
    """Cap on validation examples, taken task by task from the tasks the run trains, for quick checks."""
    feature_cache: Optional[str] = None
    """Directory of the encoder feature cache: every encoder hidden state of every clip, computed once
    (`speechllm data cache`, or at the start of training for missing clips) and read instead of the audio
    (README, "Encoder feature cache"). Keyed by encoder and audio file: a stale entry is never read."""
    feature_cache_dtype: str = "float16"
    """How cached hidden states are stored: float16 (default) | bfloat16 (fp32's range, coarser)."""


@dataclass
class PhaseConfig:
    name: str = "main"
    until_step: int = 1000
    """The phase ends before this global step (steps count optimizer updates)."""
    train: List[str] = field(default_factory=lambda: ["layer_weights", "downsampler", "projection"])
    """Trainable groups in this phase: layer_weights, downsampler, projection, lora."""
    tasks: Dict[str, float] = field(default_factory=lambda: {"asr": 1.0})
    """Task mixture: weight per task (unnormalised)."""
    task_temperature: Optional[float] = None
    """If set, multiply each weight by (task size)^(1/T): T=1 proportional to size, large T uniform."""
    lr: Dict[str, float] = field(default_factory=dict)
    """Peak learning rate per group; groups not listed use optim.lr."""
    warmup_steps: Optional[int] = None
    """Linear warmup at the start of this phase; None uses optim.warmup_steps."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 50
    schedule: str = "cosine"
    """cosine: warmup then cosine decay to min_lr_ratio over each phase; constant: warmup then flat."""
    min_lr_ratio: float = 0.1


@dataclass
class FSDPConfig:
    """trainer.strategy=fsdp: PyTorch FSDP through Lightning's FSDPStrategy (README, "Multi-GPU and multi-node")."""

    sharding_strategy: str = "FULL_SHARD"
    """FULL_SHARD: parameters, gradients and optimizer state sharded across all ranks | SHARD_GRAD_OP: parameters
    stay gathered from forward to backward (less communication, more memory) | NO_SHARD: replicated, like DDP."""
    cpu_offload: bool = False
    """Keep the sharded parameters and gradients in host memory between uses: slower, for LLMs that do not fit."""


@dataclass
class TrainerConfig:
    """Arguments passed to lightning.Trainer (subset we support and test)."""

    accelerator: str = "auto"
    devices: Any = "auto"
    """Devices per node (processes per node under torchrun or SLURM)."""
    num_nodes: int = 1
    strategy: str = "auto"
    """auto (one device, or DDP over several) | ddp | fsdp (shards the LLM across ranks; see trainer.fsdp)."""
    precision: str = "32-true"
    """32-true (or 32) | bf16-mixed (autocast to bfloat16, fp32 weights) | 16-mixed (float16 with loss scaling,
    GPU only)."""
    compile: bool = False
    """torch.compile each LLM decoder layer in place (parameter names and checkpoints unchanged); the first
    steps, and the first batches of new shapes, wait for compilation."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    max_steps: int = -1
    """-1 runs until the last phase's until_step; a smaller value stops early (schedules still fit)."""
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0
    log_every_n_steps: int = 10
    val_check_interval: Optional[int] = 100
    """Validate every N training batches; None disables validation."""
    limit_val_batches: Optional[int] = None
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100
    """Write checkpoints/last.ckpt every N steps (and always at the end of training); the file it replaces
    stays as last-prev.ckpt, a fallback should last.ckpt become unreadable."""
    keep_best: int = 0
    """Also keep the K best checkpoints by `monitor` (checkpoints/best-step=...ckpt), ranked at each validation."""
    monitor: str = "val/loss"
    """Validation metric that ranks checkpoints for keep_best: val/loss, val/loss/<task>, ..."""
    mode: str = "min"
    """min: a lower `monitor` is better | max."""


@dataclass
class FaultsConfig:
    max_bad_steps: int = 10
    """A step with a non-finite loss or gradient is skipped (no update); this many in a row stop the run."""
    slurm_requeue: bool = True
    """On SIGUSR1 inside a SLURM job, requeue the job (`scontrol requeue`) once the checkpoint is saved."""


@dataclass
class EvalConfig:
    """Answers generated during validation, and the defaults `speechllm eval` takes from the run."""

    generate: bool = False
    """Validation also answers the dev examples (greedy) and logs each task's metrics as val/<task>/<metric>."""
    generate_every_n_validations: int = 1
    """Generate at every N-th validation only (loss is computed at every one)."""
    max_new_tokens: Optional[int] = None
    """Cap on generated tokens for every task; None: per-task defaults (short labels, long transcripts)."""
    examples_table: int = 4
    """Validation answers (audio, instruction, reference, prediction) logged as a W&B table; 0: none."""
    wer_normalize: str = "lower,punct,whitespace"
    """Text normalisation before WER: a comma-separated subset of lower, punct, whitespace, or none."""


@dataclass
class WandbConfig:
    mode: str = "auto"
    """auto: online when an API key is configured, else offline | online | offline | disabled."""
    project: str = "speechllm"
    entity: Optional[str] = None


@dataclass
class PresetsConfig:
    dir: str = "configs"
    """Where preset files live (relative to the working directory, else to the repository)."""
    model: Optional[str] = "tiny"
    data: Optional[str] = "synth"
    trainer: Optional[str] = "cpu"


@dataclass
class RunConfig:
    run_name: str = "stage1"
    """Output goes to <output_dir>/<run_name>/."""
    output_dir: str = "runs"
    stage: str = "stage1"
    seed: int = 0
    init_from: Optional[str] = None
    """A previous stage's checkpoint or run directory: load its trained weights (new optimizer, step 0)."""
    resume: str = "auto"
    """auto: continue from <run>/checkpoints/last.ckpt if it exists | never | a checkpoint path."""
    presets: PresetsConfig = field(default_factory=PresetsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    phases: List[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def load_config(stage_file: str | Path | None, overrides: List[str] = ()) -> DictConfig:
    """Compose presets < stage file < overrides into a validated RunConfig (as a DictConfig)."""
    stage = _load_yaml(stage_file) if stage_file else OmegaConf.create()
    cli = [_parse_override(text) for text in overrides]
    cfg = OmegaConf.structured(RunConfig)
    # The presets section picks the preset files, so it is resolved before everything else.
    presets = _merge(OmegaConf.structured(PresetsConfig), stage.get("presets", {}), f"{stage_file}")
    for key, value in cli:
        if key.startswith("presets."):
            _update(presets, key.removeprefix("presets."), value, "command line")
    for kind in ("model", "data", "trainer"):
        name = presets[kind]
        if name:
            path = _preset_path(presets.dir, kind, name)
            cfg = _merge(cfg, {kind: _load_yaml(path)}, str(path))
    cfg = _merge(cfg, stage, str(stage_file))
    for key, value in cli:
        _update(cfg, key, value, "command line")
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks the schema cannot express: allowed values and cross-field consistency."""
    _one_of("model.encoder.kind", cfg.model.encoder.kind, ENCODER_KINDS)
    _one_of("model.llm.kind", cfg.model.llm.kind, LLM_KINDS)
    _one_of("model.layer_weights.normalization", cfg.model.layer_weights.normalization, ("softmax", "mean"))
    _one_of("data.on_bad_example", cfg.data.on_bad_example, ("error", "skip"))
    _one_of("data.feature_cache_dtype", cfg.data.feature_cache_dtype, ("float16", "bfloat16"))
    _one_of("optim.schedule", cfg.optim.schedule, ("cosine", "constant"))
    _one_of("model.llm.attn_implementation", cfg.model.llm.attn_implementation, ATTN_IMPLEMENTATIONS)
    _validate_trainer(cfg.trainer)
    if cfg.trainer.strategy == "fsdp" and cfg.eval.generate:
        # Every FSDP layer is a collective, and ranks generate different numbers of tokens per task.
        raise ConfigError("eval.generate: not available with trainer.strategy=fsdp (ranks would wait on each "
                          "other's generation steps); evaluate checkpoints with `speechllm eval` instead")
    _one_of("wandb.mode", cfg.wandb.mode, ("auto", "online", "offline", "disabled"))
    _one_of("checkpoint.mode", cfg.checkpoint.mode, ("min", "max"))
    if not cfg.checkpoint.monitor.startswith("val/"):
        raise ConfigError(f"checkpoint.monitor: '{cfg.checkpoint.monitor}' is not a validation metric (val/...)")
    if cfg.checkpoint.keep_best < 0:
        raise ConfigError(f"checkpoint.keep_best: {cfg.checkpoint.keep_best} must be 0 (off) or more")
    if cfg.faults.max_bad_steps < 1:
        raise ConfigError(f"faults.max_bad_steps: {cfg.faults.max_bad_steps} must be at least 1")
    for step in (s.strip() for s in cfg.eval.wer_normalize.split(",")):
        if step not in (*WER_NORMALIZATION_STEPS, "none", ""):
            raise ConfigError(f"eval.wer_normalize: '{step}' is not one of {', '.join(WER_NORMALIZATION_STEPS)}, none")
    if cfg.eval.generate_every_n_validations < 1 or cfg.eval.examples_table < 0:
        raise ConfigError("eval.generate_every_n_validations must be >= 1 and eval.examples_table >= 0")
    if cfg.model.llm.loss_chunk_tokens < 0:
        raise ConfigError(f"model.llm.loss_chunk_tokens: {cfg.model.llm.loss_chunk_tokens} must be 0 (off) or more")
    if cfg.model.llm.loss_chunk_tokens and cfg.model.llm.kind == "seq2seq":
        raise ConfigError("model.llm.loss_chunk_tokens: decoder-only LLMs only (kind: causal); set it to 0 for seq2seq")
    if cfg.model.llm.pretrained is None and "model_type" not in cfg.model.llm.architecture:
        raise ConfigError("model.llm: set `pretrained` (hub name or local path) or `architecture.model_type`")
    if cfg.trainer.max_steps == 0 or cfg.trainer.max_steps < -1:
        raise ConfigError(f"trainer.max_steps: {cfg.trainer.max_steps} leaves nothing to train (-1 runs every phase)")
    if not cfg.phases:
        raise ConfigError("phases: a stage needs at least one phase")
    previous_end = 0
    for i, phase in enumerate(cfg.phases):
        where = f"phases[{i}] ({phase.name})"
        if phase.until_step <= previous_end:
            raise ConfigError(f"{where}.until_step={phase.until_step} must be greater than {previous_end}")
        previous_end = phase.until_step
        for group in list(phase.train) + list(phase.lr):
            _one_of(f"{where}.train/lr group", group, TRAINABLE_GROUPS)
        if "lora" in phase.train and cfg.model.lora.rank == 0:
            raise ConfigError(f"{where}.train: trains `lora` but model.lora.rank is 0")
        if not any(w > 0 for w in phase.tasks.values()):
            raise ConfigError(f"{where}.tasks: needs at least one task with a positive weight")


def _validate_trainer(t: DictConfig) -> None:
    _one_of("trainer.strategy", t.strategy, STRATEGIES)
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("trainer.fsdp.sharding_strategy", t.fsdp.sharding_strategy, SHARDING_STRATEGIES)
    if t.precision == "16-mixed" and t.accelerator == "cpu":
        raise ConfigError("trainer.precision: 16-mixed needs a GPU (float16 loss scaling); use bf16-mixed or 32-true on CPU")
    if t.accumulate_grad_batches < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches: {t.accumulate_grad_batches} must be at least 1")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{source}: {key + ': ' if key else ''}{_first_line(err)}") from None


def _parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a YAML value; keys may index lists (`phases.1.until_step=200`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"command line: '{text}' is not key=value")
    try:  # OmegaConf's own YAML reading: `1e-3` is a float, `[a,b]` a list, `null` None
        return key.strip(), OmegaConf.from_dotlist([f"value={value}"]).value
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line: {key}: value '{value}' is not valid YAML ({_first_line(err)})") from None


def _update(cfg: DictConfig, key: str, value: Any, source: str) -> None:
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except (OmegaConfBaseException, TypeError, ValueError, IndexError) as err:
        raise ConfigError(f"{source}: {key}: {_first_line(err)}") from None


def _load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError or OmegaConf errors: both are bad files
        raise ConfigError(f"{path}: not valid YAML ({_first_line(err)})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def _preset_path(presets_dir: str, kind: str, name: str) -> Path:
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    for root in (Path(presets_dir), Path(__file__).resolve().parent.parent / presets_dir):
        candidate = root / kind / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"presets.{kind}: no preset '{name}' in {presets_dir}/{kind}/")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
