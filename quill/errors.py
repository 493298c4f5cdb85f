"""Typed errors that users can cause. The server maps each to a 4xx response; none of them
should ever surface as a traceback from deep inside the engine.

An error knows which request field it is about (`param`, in the engine's and `SamplingParams`'
names: "prompt", "max_tokens", "logit_bias", ...) and a stable machine-readable `code` where
clients act on one (OpenAI's `context_length_exceeded`). Whoever raises it says so; nobody
recovers either from the message text. The server renames `param` to its own field names
(a chat request's prompt is its `messages`)."""
from __future__ import annotations


# An error message quotes at most this much of a value the client sent: enough to recognise it,
# never the whole of a 1,000-item list or a 4 MB string.
QUOTE_CHARS = 100


def quoted(value) -> str:
    """`repr(value)`, cut to `QUOTE_CHARS` characters (with how long it was) for an error message."""
    text = repr(value)
    if len(text) <= QUOTE_CHARS:
        return text
    size = f"{len(value):,} items" if isinstance(value, (list, tuple, dict, set)) else f"{len(text):,} characters"
    return f"{text[:QUOTE_CHARS]}... ({size})"


class QuillError(Exception):
    """Base class for every error Quill raises on purpose."""

    param: str | None = None  # the request field at fault, if one is
    code: str | None = None  # a stable reason clients can act on

    def __init__(self, message: str = "", *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class ModelLoadError(QuillError):
    """A model file or directory is missing, truncated, corrupt, or not a model."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is well formed but uses an architecture or tensor type Quill cannot run."""


class InvalidRequestError(QuillError, ValueError):
    """A request or sampling parameter is malformed or out of range."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus the requested output) does not fit the model's context window."""

    param = "prompt"
    code = "context_length_exceeded"


class ChatTemplateError(InvalidRequestError):
    """The model has no chat template, or the template failed to render these messages."""

    param = "messages"


class StructuredOutputError(InvalidRequestError):
    """A structured-output constraint (JSON schema, regex, choice, grammar, tools) is invalid or
    uses a feature the grammar matcher does not support. `param` names the field at fault."""

    code = "invalid_value"

    def __init__(self, message: str, *, param: str, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


def check_unicode(text: str, param: str | None = None) -> str:
    """`text`, if all of it can be written as UTF-8. A lone surrogate (JSON's "\\ud800", or a byte
    a shell could not decode, as Python hands it on) cannot: no tokenizer, log or client takes one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"The text has a lone surrogate (U+{ord(text[exc.start]):04X}) at character "
                                  f"{exc.start}, which is not valid Unicode.", param=param, code="invalid_value") from None
    return text
