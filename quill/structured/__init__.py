"""Structured output: grammar matchers, token masks, tool-call parsing.

- `constraints.py`: the five constraint kinds (JSON schema, any JSON object, regex, choice, Lark/GBNF
  grammar) as llguidance grammars with canonical keys, checked without a tokenizer;
- `compiler.py`: grammars compiled for a model's tokenizer, cached by key (LRU);
- `matcher.py`: one sequence's matcher (advance, masks, rollback), and why llguidance;
- `masks.py`: a step's masks over the logits rows; `stats.py`: counters for metrics;
- `decoding.py`: what the engine talks to (masks filled on a worker during the forward pass, greedy
  picks vetted after it);
- tool calling: `tools.py`, the call formats and the grammars for `tool_choice`; `tool_calls.py`,
  calls parsed out of the output (streaming deltas too); `tool_messages.py`, a conversation with
  tools as a chat template receives it (the fallback prompt for templates without tools).
"""
from quill.structured.constraints import Constraint, constraint_from_fields
from quill.structured.decoding import MaskJob, StructuredDecoding
from quill.structured.masks import TokenMasks
from quill.structured.stats import StructuredStats

__all__ = ["Constraint", "MaskJob", "StructuredDecoding", "StructuredStats", "TokenMasks", "constraint_from_fields"]
