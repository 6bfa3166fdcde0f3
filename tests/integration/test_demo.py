"""The demo pipeline (`make demo`) end to end at a token size: real corpus, stand-ins pretrained and saved in
HF format, real `speechllm train` and `speechllm eval` commands, and the final table.

This proves the plumbing, not accuracy: a few steps teach nothing. Accuracy is measured by `make demo`
(README, "The demo").
"""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoTokenizer

from speechllm.demo.pipeline import Demo, DemoSize
from speechllm.evaluation.evaluate import load_run_config
from speechllm.model.speech_llm import SpeechLLM

TOKEN_SIZE = DemoSize(train_per_task=16, asr_train_clips=20, eval_per_task=6, encoder_steps=4,
                      encoder_batch_seconds=12.0, lm_steps=4, lm_examples_per_task=40, stand_in_workers=2,
                      stage1_steps=3, stage1_batch_seconds=30.0, warmup_steps=2, multitask_steps=2,
                      val_check_interval=3, transcripts_as_asr=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    pipeline = Demo(root, TOKEN_SIZE, tasks=("asr", "ic"), console=Console(quiet=True))
    return pipeline, pipeline.run()


def test_the_demo_writes_one_row_per_task_with_every_comparison(demo):
    pipeline, results = demo
    rows = {row["task"]: row for row in results["rows"]}
    assert set(rows) == {"asr", "ic"}
    for row in rows.values():
        for column in ("seen", "heldout", "untrained", "ablation", "ablation_heldout"):
            assert row[column] is not None and row[column] >= 0, (row["task"], column)
        assert row["target"] == {"asr": 0.20, "ic": 0.90}[row["task"]]
    assert 0 < rows["ic"]["majority"] < 1 and rows["asr"]["majority"] is None
    train = [json.loads(line)["task"] for line in (pipeline.corpus / "train.jsonl").read_text().splitlines()]
    assert (train.count("asr"), train.count("ic")) == (20, 16)  # stage 1's ASR gets its own, larger share
    assert json.loads((pipeline.root / "results.json").read_text()) == results
    assert "| asr | wer |" in (pipeline.root / "results.md").read_text()
    # The stand-ins' own dev scores, the LM's transcription of dev sentences given as text among them.
    assert results["stand_ins"]["llm"]["dev_wer_from_text"] >= 0 and results["stand_ins"]["encoder"]["dev_cer"] >= 0
    assert "transcribing dev sentences given as spoken text, WER" in (pipeline.root / "results.md").read_text()
    # Each run trained for its own budget, and stage 2 started from stage 1's weights.
    steps = {run: json.loads((pipeline.root / run / "eval" / name / "report.json").read_text())["global_step"]
             for run, name in (("stage2", "test-both"), ("ablation", "test-both"), ("untrained", "test-seen"))}
    assert steps == {"stage2": 4, "ablation": 7, "untrained": 1}
    assert load_run_config(pipeline.root / "stage2").init_from == str(pipeline.root / "stage1")
    # The size decides whether ASR also trains on the other clips' transcripts, over the demo preset's `true`
    # (the reduced demo in CI turns it off this way).
    assert not any(load_run_config(pipeline.root / run).data.transcripts_as_asr
                   for run in ("untrained", "stage1", "stage2", "ablation"))
    # Both multitask runs keep the stage files' mix (ASR weighted 3) and give the tasks left out weight 0.
    for run in ("stage2", "ablation"):
        mix = dict(load_run_config(pipeline.root / run).phases[1].tasks)
        assert mix == {"asr": 3.0, "ic": 1.0, "st": 0.0, "sf": 0.0, "kwe": 0.0, "kws": 0.0, "sc": 0.0, "sns": 0.0}, run


def test_answers_are_budgeted_at_twice_the_longest_training_answer(demo):
    pipeline, _ = demo
    tokenizer = AutoTokenizer.from_pretrained(pipeline.root / "pretrained" / "llm")
    longest = {}
    for line in (pipeline.corpus / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        length = len(tokenizer(row["target"], add_special_tokens=False)["input_ids"])
        longest[row["task"]] = max(longest.get(row["task"], 0), length)
    for run, name in (("stage2", "test-both"), ("ablation", "test-both"), ("untrained", "test-seen")):
        report = json.loads((pipeline.root / run / "eval" / name / "report.json").read_text())
        budgets = {task: scores["max_new_tokens"] for task, scores in report["tasks"].items()}
        assert budgets == {task: 2 * (n + 1) for task, n in longest.items()}, run  # not eval's default 128 / 32


def test_the_stack_loads_the_demo_stand_ins_through_from_pretrained(demo):
    pipeline, _ = demo
    root = pipeline.root
    cfg = load_run_config(root / "stage2")
    assert cfg.model.encoder.pretrained == str(root / "pretrained" / "encoder")
    assert json.loads((root / "pretrained" / "encoder" / "config.json").read_text())["architectures"] == ["Wav2Vec2Model"]
    model = SpeechLLM(cfg.model)
    for part, directory in ((model.encoder.model, "encoder"), (model.llm.get_base_model(), "llm")):
        saved = load_file(root / "pretrained" / directory / "model.safetensors")
        name = next(k for k in sorted(saved) if k.endswith(("layers.0.mlp.gate_proj.weight",
                                                            "layers.0.attention.q_proj.weight")))
        assert torch.equal(part.state_dict()[name], saved[name]), name  # pretrained weights, not a fresh init
    assert len(model.tokenizer) == json.loads((root / "pretrained" / "llm" / "config.json").read_text())["vocab_size"]


def test_a_second_run_skips_every_finished_step(demo):
    pipeline, results = demo
    checkpoint = pipeline.root / "stage2" / "checkpoints" / "last.ckpt"
    written = checkpoint.stat().st_mtime_ns
    again = Demo(pipeline.root, TOKEN_SIZE, tasks=("asr", "ic"), console=Console(quiet=True)).run()
    assert checkpoint.stat().st_mtime_ns == written
    assert [row["seen"] for row in again["rows"]] == [row["seen"] for row in results["rows"]]
    assert sum(again["invocation_timings_s"].values()) < 5
    # The whole demo's time is every invocation's: the rerun adds its few seconds to the first run's steps.
    first, total = results["step_totals_s"], again["step_totals_s"]
    assert set(total) == set(first) and all(total[step] >= first[step] for step in first)
    assert 20 < sum(first.values()) <= sum(total.values()) < sum(first.values()) + 5
    assert again["whole_demo_minutes"] == round(sum(total.values()) / 60, 1) and again["time_met"]
    whole = f"Whole demo: {again['whole_demo_minutes']} min (target ≤ 30: met)"
    assert whole in (pipeline.root / "results.md").read_text()
