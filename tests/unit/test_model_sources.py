"""Pretrained sources: a name that cannot be found is one line naming the config key, in seconds, with or
without HF_HUB_OFFLINE; a model already in the HF cache loads without the hub."""

import time

import pytest
from huggingface_hub import constants
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, WavLMModel

from speechllm.model import pretrained
from speechllm.model.pretrained import ModelSourceError, from_pretrained


@pytest.fixture(params=["offline", "no-network"])
def hub_mode(request, monkeypatch):
    """HF_HUB_OFFLINE=1, or the real network probe (this machine cannot reach the hub)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", request.param == "offline")
    pretrained.hub_reachable.cache_clear()
    yield request.param
    pretrained.hub_reachable.cache_clear()


@pytest.mark.parametrize("cls, key", [
    (WavLMModel, "model.encoder.pretrained"),
    (AutoModelForCausalLM, "model.llm.pretrained"),
    (AutoTokenizer, "model.llm.tokenizer"),
])
def test_a_name_that_cannot_be_found_is_one_line_naming_the_key(hub_mode, cls, key):
    started = time.monotonic()
    with pytest.raises(ModelSourceError) as error:
        from_pretrained(cls, "nobody/no-such-model", key)
    assert time.monotonic() - started < 15  # the hub client alone would retry for about a minute
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{key}='nobody/no-such-model'")
    assert "local directory" in message


def test_a_missing_local_directory_is_named(tmp_path):
    with pytest.raises(ModelSourceError, match=f"model.llm.pretrained: no directory {tmp_path}/gone"):
        from_pretrained(AutoModelForCausalLM, f"{tmp_path}/gone", "model.llm.pretrained")


def test_a_cached_model_loads_without_the_hub(tmp_path, monkeypatch):
    # The HF cache layout: models--<org>--<name>/refs/main names the snapshot holding the files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-qwen"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained, "hub_reachable", lambda: False)
    model = from_pretrained(AutoModelForCausalLM, "someone/tiny-qwen", "model.llm.pretrained")
    assert model.config.hidden_size == 16
