"""Text <-> token ids for every checkpoint format Quill loads, and chat templates.

Everything is backed by a Hugging Face `tokenizers.Tokenizer` (fast Rust code). A Hugging Face
directory ships one as `tokenizer.json`; a GGUF file only stores the vocabulary under llama.cpp's
`tokenizer.ggml.*` keys, so we rebuild the equivalent tokenizer from those:

- `gpt2` vocabularies are byte-level BPE with the merges stored in the file. What differs between
  models is how text is split into words before BPE; `tokenizer.ggml.pre` names that, and
  `_PRE_TOKENIZER_SPLITS` maps it to the regexes llama.cpp applies.
- `llama` vocabularies are SentencePiece BPE: pieces with scores and no merges. SentencePiece merges
  the adjacent pair whose result has the best score, which is what Hugging Face BPE does when the
  merges are listed best result first; unknown characters fall back to `<0xNN>` byte tokens.

Chat templates are Jinja2 rendered in a sandbox: they come from model files and are untrusted code.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from quill.errors import ChatTemplateError, ModelLoadError, UnsupportedModelError, check_unicode

logger = logging.getLogger(__name__)

# llama.cpp token types (`tokenizer.ggml.token_type`).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

# Tokens that end a turn or a document. llama.cpp treats each of these as end-of-generation when
# the vocabulary has it as a special token, whatever `eos_token_id` says; so do HF generation
# configs (Gemma lists `<end_of_turn>`, Llama 3 `<|eot_id|>`).
_END_OF_GENERATION_TOKENS = (
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<|return|>", "<|call|>", "<EOT>", "<end_of_utterance>",
)

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp's pre-tokenizer for files that name none (or "default"): punctuation runs first.
_LLAMA_CPP_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")

# `tokenizer.ggml.pre` -> the regexes that split text into words, applied one after the other
# (each to the pieces the previous one produced), as in llama.cpp's `llm_tokenizer_bpe`.
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": _LLAMA_CPP_DEFAULT_SPLITS,
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"), (_GPT2_SPLIT,)),
    # StarCoder-style vocabularies (SmolLM among them) never merge digits: split them off first.
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        (r"\p{N}", _GPT2_SPLIT),
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "dbrx", "smaug-bpe", "pixtral",
         "chatglm-bpe", "lfm2"),
        (_LLAMA3_SPLIT,),
    ),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan", "megrez"), (_QWEN2_SPLIT,)),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), (_GPT4O_SPLIT,)),
    "tekken": (_TEKKEN_SPLIT,),
}
# Pre-tokenizers for which llama.cpp emits a word that is itself in the vocabulary as one token,
# without merging (`ignore_merges`, as Llama 3's tokenizer.json says); merges can reach a different
# split of such a word.
_IGNORE_MERGES = frozenset(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "lfm2", "tekken")
)
# The name the GGUF writer gives each behaviour: one llama.cpp reads as the same splits and merge
# rule (llama.cpp rejects some names Quill reads, e.g. "gpt2" for "gpt-2").
_WRITTEN_PRE_TOKENIZERS = ("llama-bpe", "smaug-bpe", "qwen2", "gpt-2", "smollm", "gpt-4o", "tekken")
GPT2_SPLIT = _GPT2_SPLIT  # what a byte-level pre-tokenizer with use_regex applies


def gguf_pre_tokenizer_name(splits: Sequence[str], ignore_merges: bool) -> str | None:
    """The `tokenizer.ggml.pre` for byte-level BPE that splits words with these regexes (in order)
    and does or does not skip merges for whole-word tokens; None when llama.cpp has no such name."""
    for name in _WRITTEN_PRE_TOKENIZERS:
        if _PRE_TOKENIZER_SPLITS[name] == tuple(splits) and (name in _IGNORE_MERGES) == ignore_merges:
            return name
    return None


def known_pre_tokenizer_names() -> tuple[str, ...]:
    return _WRITTEN_PRE_TOKENIZERS


class Tokenizer:
    """A tokenizer plus what generation needs around it: BOS/EOS ids, stop ids, the chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)  # slow to ask: ~0.2 ms
        self._special_token_ids = frozenset(i for i, token in added.items() if token.special)
        end_of_generation = {
            token_id for token_id, token in added.items()
            if token.special and token.content in _END_OF_GENERATION_TOKENS
        }
        eos_ids = {*extra_eos_token_ids, *end_of_generation}
        if eos_token_id is not None:
            eos_ids.add(eos_token_id)
        self._eos_token_ids = frozenset(eos_ids)
        # Ask the backend itself rather than a config flag: its post-processor is what adds the BOS.
        self.add_bos_token = bos_token_id is not None and backend.encode("").ids[:1] == [bos_token_id]

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes from its `tokenizer.ggml.*` metadata."""
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError("the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
        kind = metadata.get("tokenizer.ggml.model")
        token_types = metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, metadata)
            default_add_bos = False
        elif kind == "llama":
            backend = _sentencepiece_bpe(tokens, token_types, metadata)
            default_add_bos = True  # llama.cpp's default for SentencePiece files that do not say
        else:
            raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")
        _add_gguf_added_tokens(backend, tokens, token_types)

        bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        _set_bos_eos_processor(
            backend, bos_id, eos_id,
            add_bos=metadata.get("tokenizer.ggml.add_bos_token", default_add_bos),
            add_eos=metadata.get("tokenizer.ggml.add_eos_token", False),
        )
        extra_eos = [metadata[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if key in metadata]
        return cls(
            backend, bos_token_id=bos_id, eos_token_id=eos_id, extra_eos_token_ids=extra_eos,
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face model directory's `tokenizer.json` and the configs around it."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json (Quill needs the fast-tokenizer file)")
        try:
            backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise ModelLoadError(f"{path / 'tokenizer.json'} is not a valid tokenizer file: {exc}") from exc
        config = _read_json(path / "tokenizer_config.json")
        bos_id = _token_id(backend, config.get("bos_token"))
        eos_id = _token_id(backend, config.get("eos_token"))
        # An explicit flag overrides the tokenizer.json post-processor, as in transformers.
        if "add_bos_token" in config or "add_eos_token" in config:
            _set_bos_eos_processor(
                backend, bos_id, eos_id,
                add_bos=bool(config.get("add_bos_token")), add_eos=bool(config.get("add_eos_token")),
            )
        extra_eos = [
            token_id
            for name in ("generation_config.json", "config.json")
            for token_id in _as_list(_read_json(path / name).get("eos_token_id"))
        ]
        if eos_id is None and extra_eos:
            eos_id = extra_eos[0]
        return cls(
            backend, bos_token_id=bos_id, eos_token_id=eos_id, extra_eos_token_ids=extra_eos,
            chat_template=_read_chat_template(path, config),
        )

    # -- token ids -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: EOS, end-of-turn tokens, and the configs' extra EOS ids."""
        return self._eos_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_token_ids

    @property
    def bos_token(self) -> str | None:
        return self._token_text(self._bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token_text(self._eos_token_id)

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) become single ids."""
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            check_unicode(text, "prompt")  # the usual cause, said plainly: a lone surrogate
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    # -- chat ------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on. `tools` (OpenAI
        function tools), assistant `tool_calls` and `role: "tool"` messages reach the template as
        templates expect them; a template without tool support gets the documented fallback
        instead (see `quill.structured.tool_messages.messages_for_template`)."""
        from quill.structured.tool_messages import messages_for_template

        source = chat_template if chat_template is not None else self.chat_template
        if source is None:
            raise ChatTemplateError(
                "this model has no chat template (it is probably a base model, not a chat model); "
                "pass one with --chat-template FILE or chat_template=..., or send a plain completion prompt"
            )
        messages, tools = messages_for_template(_checked_messages(messages), tools, source)
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "documents": None,
            **kwargs,
            "tools": tools,
            "messages": _checked_messages(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return _compile_template(source).render(**context)
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template can fail in any way: its own raise_exception, TypeError, ...
            raise ChatTemplateError(f"the chat template failed to render these messages: {exc}") from exc

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Render and tokenize a conversation, with exactly one BOS where the model wants one.

        Many templates write the BOS text themselves; encoding with special tokens on top would
        then start the prompt with two. EOS is never appended: the model is to continue the text.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, chat_template, **kwargs)
        ids = self.encode(text, add_special_tokens=False)
        if self.add_bos_token and ids[:1] != [self._bos_token_id]:
            ids.insert(0, self._bos_token_id)
        return ids


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a `.gguf` file or of a Hugging Face model directory."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_pretrained_dir(path)
    if path.is_file() and path.suffix == ".gguf":
        from quill.weights.gguf import read_gguf_metadata

        return Tokenizer.from_gguf_metadata(read_gguf_metadata(path))
    raise ModelLoadError(f"no tokenizer found at {path}: expected a .gguf file or a directory with tokenizer.json")


# -- building from GGUF metadata ---------------------------------------------------------------


def _byte_level_bpe(tokens: list[str], metadata: Mapping[str, Any]) -> BackendTokenizer:
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        raise ModelLoadError("the GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    splits = _PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        logger.warning("unknown tokenizer.ggml.pre %r; splitting words like GPT-2", pre)
        splits = (_GPT2_SPLIT,)
    bpe = models.BPE(vocab=_vocab(tokens), merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                     ignore_merges=pre in _IGNORE_MERGES)
    backend = BackendTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], token_types: list[int], metadata: Mapping[str, Any]) -> BackendTokenizer:
    # SentencePiece writes spaces as "▁", but llama.cpp's converter stores user-defined runs of
    # spaces (Gemma's "  ", "   ", ...) with real spaces. BPE sees "▁", so respell them back.
    vocab_tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    scores = metadata.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    # Best merge result first. User-defined pieces come before all others because SentencePiece
    # matches them whole before merging anything; the rest follow their scores.
    targets = sorted(
        (i for i, kind in enumerate(token_types) if kind in (_NORMAL, _USER_DEFINED)),
        key=lambda i: (token_types[i] != _USER_DEFINED, -scores[i], i),
    )
    vocab = _vocab(vocab_tokens)
    # Each part as the vocabulary's own string, not a fresh slice: Gemma 3's 515,000 merges then
    # cost their tuples alone (measured: the build's peak 60 MB lower).
    spelled = {token: token for token in vocab}
    merges = [
        (spelled[left], spelled[right])
        for piece in (vocab_tokens[i] for i in targets)
        for cut in range(len(piece) - 1, 0, -1)  # longest left part first, as transformers does
        if (left := piece[:cut]) in spelled and (right := piece[cut:]) in spelled
    ]
    del spelled
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(
        vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
        unk_token=vocab_tokens[unk_id] if unk_id is not None else None,
    )
    backend = BackendTokenizer(bpe)
    add_space_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    # llama.cpp puts the prefix space before every run of text that starts the prompt or follows a
    # special token, even a run that starts with a space ("  hi" -> "▁▁▁hi"). A normalizer does the
    # same: it runs on each piece between added tokens. (Metaspace would skip both cases.)
    escape = [normalizers.Replace(" ", "\u2581")]
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), *escape] if add_space_prefix else escape)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # drop the space the encoder put in front of the text
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a few vocabularies repeat a string; keep its first id
    return vocab


def _add_gguf_added_tokens(backend: BackendTokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Match control and user-defined tokens whole in the text, as llama.cpp does.

    Control tokens (`<|im_start|>`) and the unknown token (`<unk>`) are special: skipped when
    decoding with skip_special_tokens.
    User-defined ones (Gemma's "\\n\\n", "<table>") are ordinary text that must not be cut up.
    Tokens the builder respelled (SentencePiece space runs) are left to BPE: they are no longer
    in the vocabulary under the file's spelling.
    """
    def added(kind: int, special: bool) -> list[AddedToken]:
        return [
            AddedToken(token, special=special, normalized=False)
            for index, (token, token_type) in enumerate(zip(tokens, token_types))
            if token_type == kind and backend.token_to_id(token) == index
        ]

    backend.add_special_tokens(added(_CONTROL, special=True) + added(_UNKNOWN, special=True))
    backend.add_tokens(added(_USER_DEFINED, special=False))


def _set_bos_eos_processor(
    backend: BackendTokenizer, bos_id: int | None, eos_id: int | None, *, add_bos: bool, add_eos: bool
) -> None:
    """Make `encode(..., add_special_tokens=True)` add BOS and/or EOS around the text."""
    template, special = ["$A"], []
    if add_bos and bos_id is not None:
        bos = backend.id_to_token(bos_id)
        template.insert(0, bos)
        special.append((bos, bos_id))
    if add_eos and eos_id is not None:
        eos = backend.id_to_token(eos_id)
        template.append(eos)
        special.append((eos, eos_id))
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=special)


# -- Hugging Face directory helpers --------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _token_id(backend: BackendTokenizer, token: Any) -> int | None:
    """Id of a special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(token, Mapping):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _read_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    # transformers >= 4.43 saves the template next to the config; older versions inside it.
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


# -- chat templates -------------------------------------------------------------------------------


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain-dict copies of the messages, or a ChatTemplateError that says what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ChatTemplateError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {index} must be an object with role and content, got {message!r}")
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {index} has no string 'role'")
        content = message.get("content")
        # An assistant message that only calls tools may have no content (OpenAI sends null).
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise ChatTemplateError(f"message {index} ({message['role']}) must have string 'content'")
        # Templates test for a missing key, not for None (`{% if message.content is defined %}`).
        checked.append({key: value for key, value in message.items() if value is not None})
    return checked


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template rejected these messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &), which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def check_chat_template(source: str) -> str:
    """`source`, if it compiles as a chat template: a syntax error is the server's configuration to
    fix, said at start-up, not a fault of each client's messages later."""
    _compile_template(source)
    return source


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    # Same environment as transformers' apply_chat_template, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja2 (line {exc.lineno}): {exc.message}") from exc
