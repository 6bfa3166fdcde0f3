"""speechllm: instruction-following audio language models (SpeechVerse-style) on PyTorch Lightning."""

__version__ = "0.1.0"
