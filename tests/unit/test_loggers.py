"""W&B mode selection: online only with a key and a reachable server, never a hang."""

import socket

import pytest

from speechllm.training.loggers import wandb_mode


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    return monkeypatch


def test_no_key_means_offline(env):
    assert wandb_mode("auto") == "offline"


def test_key_and_reachable_server_means_online(env):
    with socket.create_server(("127.0.0.1", 0)) as server:
        env.setenv("WANDB_API_KEY", "k" * 40)
        env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert wandb_mode("auto") == "online"


def test_key_but_unreachable_server_falls_back_to_offline(env):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]  # closed again below: nothing listens there
    env.setenv("WANDB_API_KEY", "k" * 40)
    env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    with pytest.warns(UserWarning, match="unreachable; logging offline"):
        assert wandb_mode("auto") == "offline"


def test_explicit_mode_and_environment_win(env):
    assert wandb_mode("disabled") == "disabled"
    env.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
