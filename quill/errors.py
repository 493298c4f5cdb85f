"""Typed errors that users can cause. The server maps each to a 4xx response; none of them
should ever surface as a traceback from deep inside the engine."""


class QuillError(Exception):
    """Base class for every error Quill raises on purpose."""


class ModelLoadError(QuillError):
    """A model file or directory is missing, truncated, corrupt, or not a model."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is well formed but uses an architecture or tensor type Quill cannot run."""


class InvalidRequestError(QuillError, ValueError):
    """A request or sampling parameter is malformed or out of range."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus the requested output) does not fit the model's context window."""


class ChatTemplateError(InvalidRequestError):
    """The model has no chat template, or the template failed to render these messages."""


class StructuredOutputError(InvalidRequestError):
    """A structured-output constraint (JSON schema, regex, choice, grammar, tools) is invalid or
    uses a feature the grammar matcher does not support. `param` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
