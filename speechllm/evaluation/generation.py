"""Answers from a SpeechLLM for evaluation: a token budget per task, and batches generated task by task.

Shared by `speechllm eval`, validation during training and `speechllm predict`, so all three answer
an example the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from speechllm.data.tasks import TaskRegistry
from speechllm.model.speech_llm import SpeechLLM

# Generated-token budget by the metric a task registers: labels are short, lists longer, free text
# longest. Counted in the LLM's tokens, which are bytes for the tiny presets' ByT5 tokenizer, so the
# label budget fits the longest intent names ("recommendation_locations") byte by byte.
DEFAULT_MAX_NEW_TOKENS = {
    "accuracy": 32,
    "macro_f1": 32,
    "keyword_f1": 64,
    "slot_f1": 96,
    "wer": 128,
    "bleu": 128,
    "rouge_l": 128,
}
FALLBACK_MAX_NEW_TOKENS = 128  # tasks without a known metric, or answers to a free instruction


def token_budgets(
    registry: TaskRegistry, every_task: int | None = None, per_task: Mapping[str, int] | None = None
) -> Callable[[str], int]:
    """task -> max new tokens: `per_task[task]`, else `every_task`, else the default of the task's metric."""
    per_task = dict(per_task or {})

    def budget(task: str) -> int:
        if task in per_task:
            return per_task[task]
        if every_task is not None:
            return every_task
        metric = registry.get(task).metric if task in registry else None
        return DEFAULT_MAX_NEW_TOKENS.get(metric, FALLBACK_MAX_NEW_TOKENS)

    return budget


@torch.no_grad()
def generate_by_task(
    model: SpeechLLM,
    wave: torch.Tensor | None,
    wave_mask: torch.Tensor | None,
    instructions: Sequence[str],
    tasks: Sequence[str],
    max_new_tokens: Callable[[str], int],
    num_beams: int = 1,
    features: torch.Tensor | None = None,
    feature_mask: torch.Tensor | None = None,
) -> list[str]:
    """Answers in batch order; examples of one task are generated together, with that task's budget.

    Audio as waveforms, or as cached encoder hidden states (features (L, B, F, D), feature_mask (B, F)).
    """
    cached = features is not None
    mask_all = feature_mask if cached else wave_mask
    answers: list[str | None] = [None] * len(tasks)
    for task in dict.fromkeys(tasks):  # first-appearance order
        rows = [i for i, t in enumerate(tasks) if t == task]
        index = torch.tensor(rows, device=mask_all.device)
        mask = mask_all.index_select(0, index)
        length = int(mask.sum(-1).max())  # drop the padding only longer examples of other tasks needed
        if cached:
            audio = dict(wave=None, wave_mask=None, features=features.index_select(1, index)[:, :, :length],
                         feature_mask=mask[:, :length])
        else:
            audio = dict(wave=wave.index_select(0, index)[:, :length], wave_mask=mask[:, :length])
        texts = model.generate(
            instructions=[instructions[i] for i in rows], max_new_tokens=max_new_tokens(task), num_beams=num_beams,
            **audio,
        )
        for i, text in zip(rows, texts):
            answers[i] = text
    return answers
