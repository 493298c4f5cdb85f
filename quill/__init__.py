"""Quill: an LLM inference engine and OpenAI-compatible server in plain PyTorch."""
from quill.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
__version__ = "0.1.0"
