"""`speechllm export` of a short run that trains LoRA: a directory that `SpeechLLM.from_pretrained` loads without
Lightning, answering exactly as the checkpoint does; merged and adapter exports agree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel

from conftest import LORA_STAGE2_RUN, REPO, run_overrides, stored_dtypes
from speechllm.cli import main
from speechllm.config import load_config
from speechllm.data.audio import load_audio
from speechllm.evaluation.evaluate import load_model
from speechllm.inference import load_inference_model
from speechllm.model import speech_llm
from speechllm.model.speech_llm import SpeechLLM
from speechllm.training.run import train

MAX_NEW_TOKENS = 12
TASKS = ("asr", "ic", "sc")
LORA_RUN = (
    *LORA_STAGE2_RUN,
    "trainer.val_check_interval=null",
)
# Loads an export with Lightning made unimportable, answers the questions given as JSON, prints the answers.
STANDALONE = """
import json, sys
sys.modules["lightning"] = sys.modules["lightning.pytorch"] = None
import soundfile, torch
from speechllm.model.speech_llm import SpeechLLM
model = SpeechLLM.from_pretrained(sys.argv[1])
answers = []
for audio, instruction in json.loads(sys.argv[2]):
    wave = torch.from_numpy(soundfile.read(audio, dtype="float32")[0])[None]
    answers += model.generate(wave, torch.ones_like(wave, dtype=torch.bool), [instruction], max_new_tokens=%d)
print(json.dumps(answers))
""" % MAX_NEW_TOKENS


@pytest.fixture(scope="module")
def lora_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "stages/stage2.yaml", run_overrides(corpus, out, *LORA_RUN))
    run = train(cfg)
    lora_b = [p for name, p in run.module.model.trainable_groups()["lora"].items() if "lora_B" in name]
    assert max(float(p.abs().max()) for p in lora_b) > 1e-3  # the adapter changes the LLM: the checks below bite
    return cfg, run


@pytest.fixture(scope="module")
def questions(corpus) -> list[tuple[str, str]]:
    """(audio path, instruction): one dev example of each trained task (the corpus is 16 kHz, as the encoder)."""
    rows = [json.loads(line) for line in (corpus / "dev.jsonl").read_text().splitlines()]
    first = {row["task"]: row for row in reversed(rows) if row["task"] in TASKS}
    instructions = {"asr": "Transcribe the audio.", "ic": "What does the user want?", "sc": "Who is speaking?"}
    return [(str(corpus / first[t]["audio"]), instructions[t]) for t in TASKS]


def _answers(model: SpeechLLM, questions) -> list[str]:
    answers = []
    for audio, instruction in questions:
        wave, _ = load_audio(audio, 16000)
        with torch.inference_mode():
            answers += model.generate(wave[None], torch.ones_like(wave[None], dtype=torch.bool), [instruction],
                                      max_new_tokens=MAX_NEW_TOKENS)
    return answers


def _logits(model: SpeechLLM, questions) -> torch.Tensor:
    waves = [load_audio(audio, 16000)[0] for audio, _ in questions]
    wave = torch.zeros(len(waves), max(w.shape[0] for w in waves))
    for row, w in zip(wave, waves):
        row[: w.shape[0]] = w
    mask = torch.arange(wave.shape[1])[None] < torch.tensor([w.shape[0] for w in waves])[:, None]
    with torch.inference_mode():
        audio, audio_mask = model.encode_audio(wave, mask)
        inputs = model.build_inputs(audio, audio_mask, [q for _, q in questions], ["an answer"] * len(questions))
        return model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                         position_ids=inputs.position_ids).logits


def test_export_is_self_contained_and_answers_like_the_checkpoint(lora_run, questions, tmp_path):
    cfg, run = lora_run
    out = tmp_path / "export"
    assert main(["export", "--ckpt", str(run.run_dir), "--out", str(out)]) == 0
    for part in ("speechllm.yaml", "trained.safetensors", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "encoder/config.json", "encoder/model.safetensors",
                 "llm/config.json", "llm/model.safetensors", "tokenizer/tokenizer_config.json"):
        assert (out / part).is_file(), part
    moved = tmp_path / "elsewhere" / "model"  # paths inside are relative: the directory can move
    shutil.move(out, moved)

    checkpoint_model, _, _ = load_model(cfg, run.run_dir / "checkpoints" / "last.ckpt", torch.device("cpu"))
    expected = _answers(checkpoint_model, questions)
    result = subprocess.run([sys.executable, "-c", STANDALONE, str(moved), json.dumps(questions)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected

    exported = SpeechLLM.from_pretrained(moved)
    assert isinstance(exported.llm, PeftModel) and not any(p.requires_grad for p in exported.parameters())
    reference = checkpoint_model.state_dict()
    assert exported.state_dict().keys() == reference.keys()
    for name, tensor in exported.state_dict().items():  # frozen and trained weights alike, bit for bit
        assert torch.equal(tensor, reference[name]), name


def test_predict_loads_an_export_in_the_precision_its_run_trained_in(lora_run, questions, tmp_path, monkeypatch):
    """An export of a bf16-mixed run, predicted on a GPU (here: what `inference_dtype` answers on CUDA), is held as
    eval holds the run: frozen weights in bf16, what trained in fp32, the same answers."""
    cfg, run = lora_run
    bf16_run = tmp_path / "bf16-run"  # the same checkpoint (trained weights are fp32 either way), the run's precision
    shutil.copytree(run.run_dir, bf16_run)
    run_config = OmegaConf.load(bf16_run / "config.yaml")
    run_config.trainer.precision = "bf16-mixed"
    OmegaConf.save(run_config, bf16_run / "config.yaml")
    out = tmp_path / "export"
    assert main(["export", "--ckpt", str(bf16_run), "--out", str(out)]) == 0
    answers_for = speech_llm.inference_dtype
    monkeypatch.setattr(speech_llm, "inference_dtype", lambda precision, device: answers_for(precision, "cuda"))

    exported, _ = load_inference_model(out, torch.device("cpu"))
    assert stored_dtypes(exported) == ({torch.bfloat16}, {torch.float32})
    run_model, _ = load_inference_model(bf16_run, torch.device("cpu"))
    assert _answers(exported, questions) == _answers(run_model, questions)


def test_merged_lora_export_matches_the_adapter_export(lora_run, questions, tmp_path):
    cfg, run = lora_run
    model, _, _ = load_model(cfg, run.run_dir / "checkpoints" / "last.ckpt", torch.device("cpu"))
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", "--ckpt", str(run.run_dir), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert not (tmp_path / "merged" / "adapter").exists()
    merged, adapter = SpeechLLM.from_pretrained(tmp_path / "merged"), SpeechLLM.from_pretrained(tmp_path / "adapter")
    assert not isinstance(merged.llm, PeftModel) and isinstance(model.llm, PeftModel)  # exporting left it as it was
    without_lora = merged.llm.get_input_embeddings().weight  # tied embeddings: LoRA on q/v does not touch them
    assert torch.equal(without_lora, adapter.llm.get_input_embeddings().weight)
    merged_logits, adapter_logits = _logits(merged, questions), _logits(adapter, questions)
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=0)
    with adapter.llm.disable_adapter():  # and LoRA matters: without it the logits move well beyond that
        assert (_logits(adapter, questions) - adapter_logits).abs().max() > 1e-2


def test_export_refuses_a_directory_holding_other_files(lora_run, tmp_path, capsys):
    cfg, run = lora_run
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", "--ckpt", str(run.run_dir), "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path}: exists and is not an empty directory or a speechllm "
                                       "export; choose another --out\n")
