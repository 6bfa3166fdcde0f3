"""SpeechLLM: encoder -> layer-weighted sum -> conv downsampler -> projection -> LLM (+ LoRA)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import LogitsProcessor, LogitsProcessorList

from speechllm.config import ModelConfig
from speechllm.model.downsampler import ConvDownsampler
from speechllm.model import export
from speechllm.model.encoder import AudioEncoder, inference_dtype
from speechllm.model.layer_weights import LayerWeightedSum
from speechllm.model.llm import (
    add_lora, body_and_head, build_llm, build_tokenizer, cast_frozen_weights, check_logits_are_head_output,
    check_vocabulary,
)
from speechllm.model.projection import AudioProjection
from speechllm.model.parts import trainable_groups

IGNORE_INDEX = -100  # labels outside the target (prompt, audio, instruction, padding) never enter the loss
# The LLM's SDPA kernels, cuDNN's left out: on an H100 each of its calls took 2 ms of CPU for under 0.1 ms of GPU
# work with batches whose shapes change every step, 0.1 s of a 0.5B model's step (BENCHMARKS.md, GPU).
LLM_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class LLMInputs:
    """One batch laid out for the LLM; decoder-only sequences are left-padded (as generation needs)."""

    inputs_embeds: torch.Tensor  # (B, S, H)
    attention_mask: torch.Tensor  # (B, S)
    labels: torch.Tensor | None  # (B, S) decoder-only, (B, T) encoder-decoder; IGNORE_INDEX outside targets
    position_ids: torch.Tensor | None = None  # decoder-only: positions count only real tokens


@dataclass
class SpeechLLMOutput:
    loss: torch.Tensor  # mean cross-entropy over all target tokens of the batch
    example_losses: torch.Tensor  # (B,) mean cross-entropy over each example's target tokens
    target_tokens: torch.Tensor  # (B,) number of target tokens per example


class SpeechLLM(nn.Module):
    def __init__(self, cfg: ModelConfig | DictConfig):
        super().__init__()
        if isinstance(cfg, DictConfig):  # HF configs want plain lists and dicts
            cfg = OmegaConf.to_object(cfg)
        self.cfg = cfg
        self.is_seq2seq = cfg.llm.kind == "seq2seq"
        self.encoder = AudioEncoder(cfg.encoder)
        self.layer_weights = LayerWeightedSum(self.encoder.num_layers, cfg.layer_weights.normalization)
        d = cfg.downsampler
        self.downsampler = ConvDownsampler(self.encoder.hidden_size, d.channels, d.num_layers, d.kernel_size, d.stride)
        self.tokenizer = build_tokenizer(cfg.llm)
        llm = build_llm(cfg.llm)
        check_vocabulary(llm, self.tokenizer)
        if cfg.llm.loss_chunk_tokens:
            check_logits_are_head_output(llm)
        self.projection = AudioProjection(d.channels, llm.get_input_embeddings().weight.detach())
        self.llm = add_lora(llm, cfg.lora) if cfg.lora.rank > 0 else llm
        self.frozen_dtype: torch.dtype | None = None  # set by store_frozen_weights_in

    def trainable_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return trainable_groups(self)

    def store_frozen_weights_in(self, dtype: torch.dtype) -> None:
        """Mixed precision runs the frozen encoder and LLM under autocast anyway: their weights stored in the autocast
        dtype take half the memory and are not cast again at every step. What trains stays fp32."""
        self.encoder.cast_weights(dtype)
        trained = {param for group in self.trainable_groups().values() for param in group.values()}
        cast_frozen_weights(self.llm, dtype, trained)
        self.frozen_dtype = dtype

    def store_frozen_weights_for(self, precision: str, device: torch.device) -> None:
        """Under a Lightning *-mixed `precision` on a GPU, `store_frozen_weights_in` its autocast dtype; elsewhere
        nothing changes. Training and inference both hold the model this way."""
        dtype = inference_dtype(precision, device)
        if dtype is not None:
            self.store_frozen_weights_in(dtype)

    def for_inference(self, precision: str, device: torch.device) -> "SpeechLLM":
        """This model in eval mode on `device`, held as a run of Lightning `precision` holds it in training: under
        *-mixed on a GPU the frozen weights are stored, and `generate` runs, in the autocast dtype."""
        self.store_frozen_weights_for(precision, device)
        return self.to(device).eval()

    def save_pretrained(self, path, merge_lora: bool = False, metadata: dict | None = None):
        """A self-contained inference directory (see `speechllm.model.export`); `merge_lora` folds LoRA into the LLM."""
        return export.save_pretrained(self, path, merge_lora=merge_lora, metadata=metadata)

    @classmethod
    def from_pretrained(cls, path) -> "SpeechLLM":
        """The model a `save_pretrained` (or `speechllm export`) directory holds, in eval mode, without Lightning."""
        return export.from_pretrained(path, cls)

    def encode_audio(self, wave: torch.Tensor, wave_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wave (B, T), wave_mask (B, T) -> audio embeddings in LLM space (B, A, H) and their mask (B, A)."""
        return self.encode_features(*self.encoder(wave, wave_mask))

    def encode_features(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's hidden states (L, B, F, D) and frame mask (B, F), fresh or from the feature cache
        -> audio embeddings in LLM space (B, A, H) and their mask (B, A)."""
        if not torch.is_autocast_enabled(hidden.device.type):  # cached fp16 features, or a bf16-stored encoder
            hidden = hidden.to(self.layer_weights.weights.dtype)
        frames = self.layer_weights(hidden)
        frames, mask = self.downsampler(frames, frame_mask)
        return self.projection(frames), mask

    def _embed_audio(self, wave, wave_mask, features, feature_mask) -> tuple[torch.Tensor, torch.Tensor]:
        if features is not None:
            return self.encode_features(features, feature_mask)
        return self.encode_audio(wave, wave_mask)

    def forward(
        self,
        wave: torch.Tensor | None,
        wave_mask: torch.Tensor | None,
        instructions: list[str],
        targets: list[str],
        features: torch.Tensor | None = None,
        feature_mask: torch.Tensor | None = None,
    ) -> SpeechLLMOutput:
        """Audio as waveforms (wave, wave_mask), or as cached encoder hidden states (features (L, B, F, D),
        feature_mask (B, F)) with wave and wave_mask None."""
        audio, audio_mask = self._embed_audio(wave, wave_mask, features, feature_mask)
        inputs = self.build_inputs(audio, audio_mask, instructions, targets)
        chunk = self.cfg.llm.loss_chunk_tokens
        with sdpa_kernel(LLM_SDPA_BACKENDS):
            if chunk and not self.is_seq2seq:
                body, head = body_and_head(self.llm)
                hidden, labels = self._answer_hidden_states(body, inputs)
                return _chunked_target_cross_entropy(hidden, head, labels, chunk)
            logits, labels = self._llm_logits(inputs)
        return _target_cross_entropy(logits, labels)

    def _llm_logits(self, inputs: LLMInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits at the target positions and their labels."""
        if self.is_seq2seq:
            decoder_input_ids = self.llm.prepare_decoder_input_ids_from_labels(labels=inputs.labels)
            logits = self.llm(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                decoder_input_ids=decoder_input_ids,
                use_cache=False,  # one pass over whole sequences: a KV cache would only take memory
            ).logits
            labels = inputs.labels
        else:
            # Rows are left-padded, so every target sits in the last `answer` positions: the LM head (and the
            # fp32 loss) runs only there, not over audio and prompt (B x S x vocab logits at a 150k vocab).
            answer = _answer_length(inputs.labels)
            logits = self.llm(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
                use_cache=False,
                logits_to_keep=answer + 1,
            ).logits[:, :-1]
            labels = inputs.labels[:, -answer:]  # token t is predicted from positions < t
        return logits, labels

    def _answer_hidden_states(self, body: nn.Module, inputs: LLMInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder-only: the LLM body's final hidden states at the positions that predict the targets (B, T, H)
        and their labels (B, T), as `_llm_logits` has them before the LM head."""
        answer = _answer_length(inputs.labels)
        hidden = body(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=False,
        ).last_hidden_state
        return hidden[:, -answer - 1:-1], inputs.labels[:, -answer:]

    @torch.no_grad()
    def generate(
        self,
        wave: torch.Tensor | None,
        wave_mask: torch.Tensor | None,
        instructions: list[str],
        max_new_tokens: int = 64,
        num_beams: int = 1,
        features: torch.Tensor | None = None,
        feature_mask: torch.Tensor | None = None,
    ) -> list[str]:
        """Greedy (num_beams=1) or beam-search answers to `instructions` about each audio (as in `forward`)."""
        with self._mixed_precision(), sdpa_kernel(LLM_SDPA_BACKENDS):
            audio, audio_mask = self._embed_audio(wave, wave_mask, features, feature_mask)
            inputs = self.build_inputs(audio, audio_mask, instructions, targets=None)
            tokens = self.llm.generate(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                logits_processor=self._decodable_ids(),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return [text.strip() for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def _decodable_ids(self) -> LogitsProcessorList:
        """Generation limited to ids the tokenizer can decode, where the LLM embeds more rows than it has tokens
        (padded vocabularies; the realistic preset's byte tokenizer on Qwen2's 151,936 rows, whose untrained model
        emitted ids that made decoding fail)."""
        tokens = len(self.tokenizer)
        if self.llm.get_input_embeddings().num_embeddings <= tokens:
            return LogitsProcessorList()
        return LogitsProcessorList([_FirstIdsOnly(tokens)])

    def _mixed_precision(self):
        """Autocast in the dtype the frozen weights are stored in, where no caller (Lightning) set it up: eval and
        predict then compute what training's validation does, with what trains in fp32."""
        device = self.layer_weights.weights.device.type
        if self.frozen_dtype is None or torch.is_autocast_enabled(device):
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=self.frozen_dtype)

    def build_inputs(
        self, audio: torch.Tensor, audio_mask: torch.Tensor, instructions: list[str], targets: list[str] | None
    ) -> LLMInputs:
        if self.is_seq2seq:
            return self._seq2seq_inputs(audio, audio_mask, instructions, targets)
        return self._causal_inputs(audio, audio_mask, instructions, targets)

    def _causal_inputs(self, audio, audio_mask, instructions, targets) -> LLMInputs:
        """[prompt prefix][audio][instruction + answer prefix][target + eos], left-padded."""
        prefix = self._token_ids(self.cfg.llm.prompt_prefix)
        rows, answers = [], []
        for i, instruction in enumerate(instructions):
            answer = self._token_ids(targets[i]) + [self.tokenizer.eos_token_id] if targets is not None else []
            rows.append((prefix, self._token_ids(instruction + self.cfg.llm.answer_prefix) + answer))
            answers.append(answer)
        embeds, mask = self._assemble(audio, audio_mask, rows, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        labels = None
        if targets is not None:  # each row ends with its answer
            labels = _pad_ids(answers, embeds.shape[1], IGNORE_INDEX, left=True, device=embeds.device)
        return LLMInputs(embeds, mask, labels, positions)

    def _seq2seq_inputs(self, audio, audio_mask, instructions, targets) -> LLMInputs:
        """Encoder reads [audio][instruction + eos]; the decoder is trained on [target + eos]."""
        eos = self.tokenizer.eos_token_id
        rows = [([], self._token_ids(instruction) + [eos]) for instruction in instructions]
        embeds, mask = self._assemble(audio, audio_mask, rows, left=False)
        labels = None
        if targets is not None:
            answers = [self._token_ids(target) + [eos] for target in targets]
            length = max(len(a) for a in answers)
            labels = _pad_ids(answers, length, IGNORE_INDEX, left=False, device=embeds.device)
        return LLMInputs(embeds, mask, labels)

    def _assemble(
        self, audio: torch.Tensor, audio_mask: torch.Tensor, rows: list[tuple[list[int], list[int]]], left: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i: token ids rows[i][0], example i's valid audio, token ids rows[i][1]; padded with zero vectors
        -> inputs_embeds (B, S, H) and attention mask (B, S).

        Laid out on the host and built with one embedding lookup and one copy of the audio into its slots:
        per-example device work (a boolean-mask gather and three small embedding lookups each) synchronised
        the GPU dozens of times a step (BENCHMARKS.md).
        """
        table = self.llm.get_input_embeddings()
        device = table.weight.device
        lengths = audio_mask.sum(-1).tolist()  # the batch's one device sync; valid audio is a prefix of each row
        sizes = [len(before) + n + len(after) for (before, after), n in zip(rows, lengths)]
        width, frames = max(sizes), audio.shape[1]
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        slots, sources = [], []
        for i, ((before, after), n, size) in enumerate(zip(rows, lengths, sizes)):
            start = width - size if left else 0
            ids[i, start:start + size] = torch.tensor(before + [0] * n + after, dtype=torch.long)
            mask[i, start:start + size] = 1
            audio_start = i * width + start + len(before)
            slots.append(torch.arange(audio_start, audio_start + n))
            sources.append(torch.arange(i * frames, i * frames + n))
        mask = mask.to(device)
        embeds = table(ids.to(device)) * mask.unsqueeze(-1)
        flat_audio = audio.reshape(-1, audio.shape[-1]).index_select(0, torch.cat(sources).to(device))
        embeds = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, torch.cat(slots).to(device),
                                                                  flat_audio.to(embeds.dtype))
        return embeds.reshape(len(rows), width, -1), mask

    def _token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []


class _FirstIdsOnly(LogitsProcessor):
    """Scores of ids from `count` on set to -inf: one slice a step (transformers' SuppressTokens compares every id)."""

    def __init__(self, count: int):
        self.count = count

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.count :] = -float("inf")
        return scores


def _pad_ids(rows: list[list[int]], length: int, fill: int, left: bool, device) -> torch.Tensor:
    padded = [[fill] * (length - len(r)) + r if left else r + [fill] * (length - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long, device=device)


def _answer_length(labels: torch.Tensor) -> int:
    """The longest answer of a left-padded decoder-only batch (one device sync)."""
    return int((labels != IGNORE_INDEX).sum(-1).max())


def _target_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> SpeechLLMOutput:
    # (tokens, vocab) rows, not (B, vocab, T): with the class dimension in the middle CUDA takes its spatial
    # softmax kernels, 69% of the GPU time of a Qwen2-0.5B stage-1 step on an H100 (BENCHMARKS.md).
    token_losses = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(labels)
    return _reduced(token_losses, labels)


def _chunked_target_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int
) -> SpeechLLMOutput:
    """`_target_cross_entropy(head(hidden), labels)` with the logits of at most `chunk` target tokens alive at a
    time: each chunk's logits are reduced to token losses and dropped, and recomputed in the backward pass (one
    more LM-head forward). Padding positions of shorter answers get no logits at all."""
    flat_labels = labels.flatten()
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    states, targets = hidden.flatten(0, 1).index_select(0, rows), flat_labels.index_select(0, rows)
    losses = torch.cat([
        checkpoint(_head_cross_entropy, head, states[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
        for i in range(0, len(rows), chunk)
    ])
    token_losses = losses.new_zeros(flat_labels.shape).index_copy(0, rows, losses).view_as(labels)
    return _reduced(token_losses, labels)


def _head_cross_entropy(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(states).float(), targets, reduction="none")


def _reduced(token_losses: torch.Tensor, labels: torch.Tensor) -> SpeechLLMOutput:
    """Token losses (B, T), zero outside the targets -> the batch's and each example's mean over target tokens."""
    counts = (labels != IGNORE_INDEX).sum(-1)
    sums = token_losses.sum(-1)
    return SpeechLLMOutput(
        loss=sums.sum() / counts.sum().clamp(min=1),
        example_losses=sums / counts.clamp(min=1),
        target_tokens=counts,
    )
