"""Quill: an LLM inference engine and OpenAI-compatible server in plain PyTorch."""
from quill.outputs import RequestMetrics, RequestOutput
from quill.sampling_params import SamplingParams

__all__ = ["LLM", "RequestMetrics", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily so `import quill` (e.g. for the CLI's --help) does not load torch models.
    if name == "LLM":
        from quill.llm import LLM

        return LLM
    raise AttributeError(name)
