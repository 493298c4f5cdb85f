"""The tokenizer a GGUF file carries (`tokenizer.*` metadata), written the way llama.cpp's converter
(convert_hf_to_gguf.py) writes it, so that a file Quill writes runs by itself in Quill and llama.cpp.

A GGUF source already holds these keys: they are copied. A Hugging Face directory's `tokenizer.json`
converts when it is one of the two kinds GGUF describes:
- byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM) -> `tokenizer.ggml.model = "gpt2"`: the vocabulary,
  its merges, and `tokenizer.ggml.pre`, the name of the rule that splits text into words before BPE;
- SentencePiece BPE with byte fallback (Llama 2, Gemma) -> `"llama"`: pieces with scores, no merges.

llama.cpp's converter names the pre-tokenizer by hashing the ids its fixed check text encodes to, which
recognises only the released vocabularies listed in the converter. We read the pre-tokenizer instead:
its split regexes and merge rule are looked up among those llama.cpp has names for
(`gguf_pre_tokenizer_name`, next to the table Quill's own GGUF reader uses), so a vocabulary trained
with a known rule converts whatever its tokens, and an unknown rule is an error rather than a file
that splits words wrongly. Unigram and WordPiece vocabularies are refused the same way.

Every conversion is then checked end to end: the tokenizer Quill rebuilds from the metadata must
encode llama.cpp's check text, and every added token in context, exactly as the directory's own does.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from quill.errors import ModelLoadError, UnsupportedModelError
from quill.tokenizer import GPT2_SPLIT, Tokenizer, gguf_pre_tokenizer_name, known_pre_tokenizer_names
from quill.weights import Checkpoint

K = gguf.Keys.Tokenizer
T = gguf.TokenType
_SPECIAL_ID_KEYS = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "sep": K.SEP_ID, "pad": K.PAD_ID,
                    "mask": K.MASK_ID}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"  # SentencePiece's visible space

# llama.cpp's own check text (convert_hf_to_gguf.py, `get_vocab_base_pre`): whitespace runs, emoji
# sequences, digit runs, scripts without spaces, punctuation runs and contractions in both cases.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


class TokenizerConversionError(UnsupportedModelError):
    """The checkpoint's tokenizer cannot be written as GGUF metadata that reproduces it."""


@dataclass
class GGUFTokenizer:
    metadata: dict[str, Any]  # tokenizer.* keys, as `write_gguf` takes them
    notes: list[str] = field(default_factory=list)  # what the file keeps only approximately


@dataclass(frozen=True)
class _Kind:
    """What the GGUF metadata says about how text becomes pieces."""

    model: str  # tokenizer.ggml.model
    keys: dict[str, Any]  # tokenizer.ggml.pre or add_space_prefix
    notes: tuple[str, ...] = ()
    exact_after_specials: bool = True  # False: the prefix space differs after special tokens
    exact_leading_space: bool = True  # False: it differs for text that starts with a space


def checkpoint_tokenizer(checkpoint: Checkpoint) -> GGUFTokenizer:
    """The tokenizer metadata a GGUF file of this checkpoint must carry: a GGUF source's own, or its
    Hugging Face directory's tokenizer converted. Raises TokenizerConversionError when there is none."""
    if checkpoint.format == "gguf":
        metadata = {key: value for key, value in checkpoint.metadata.items() if key.startswith("tokenizer.")}
        if K.LIST not in metadata:
            raise TokenizerConversionError(f"{checkpoint.path.name} has no tokenizer to carry over")
        return GGUFTokenizer(metadata)
    return convert_hf_tokenizer(checkpoint.path, checkpoint.config.vocab_size)


def convert_hf_tokenizer(directory: str | Path, vocab_size: int) -> GGUFTokenizer:
    """The `tokenizer.*` metadata for a Hugging Face directory's tokenizer, for a model whose
    embedding has `vocab_size` rows (ids the tokenizer does not use become unused `[PADn]` tokens)."""
    directory = Path(directory)
    try:
        reference = Tokenizer.from_pretrained_dir(directory)
    except ModelLoadError as exc:
        raise TokenizerConversionError(str(exc)) from exc
    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    _check_bpe(model)
    kind = _sentencepiece_kind(spec) if model.get("byte_fallback") else _byte_level_kind(spec)
    special = gguf.SpecialVocab(directory, load_merges=kind.model == "gpt2", n_vocab=vocab_size)

    tokens, token_types = _token_table(spec, vocab_size, sentencepiece=kind.model == "llama")
    metadata: dict[str, Any] = {K.MODEL: kind.model, **kind.keys, K.LIST: tokens, K.TOKEN_TYPE: token_types}
    if kind.model == "gpt2":
        metadata[K.MERGES] = special.merges
    else:
        metadata[K.SCORES] = _piece_scores(tokens, token_types, _merge_pairs(model))
    metadata.update(_special_ids(special, spec, tokens))
    metadata.update(_add_flags(reference, metadata.get(K.BOS_ID), metadata.get(K.EOS_ID)))
    if reference.chat_template is not None:
        metadata[K.CHAT_TEMPLATE] = reference.chat_template

    _verify(metadata, reference, spec, kind, directory)
    return GGUFTokenizer(metadata, list(kind.notes))


# -- what kind of tokenizer.json ------------------------------------------------------------------


def _check_bpe(model: dict[str, Any]) -> None:
    kind = model.get("type")
    if kind != "BPE":
        raise TokenizerConversionError(
            f"tokenizer.json has a {kind} model; Quill writes only BPE vocabularies to GGUF (byte-level "
            "like GPT-2 and Llama 3, or SentencePiece-style with byte fallback like Llama 2 and Gemma)"
        )
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerConversionError(
            "tokenizer.json's BPE uses dropout, a subword prefix or a word suffix, which GGUF cannot describe"
        )


def _steps(node: dict[str, Any] | None, sequence_key: str) -> list[dict[str, Any]]:
    if not node:
        return []
    return list(node[sequence_key]) if node.get("type") == "Sequence" else [node]


def _byte_level_kind(spec: dict[str, Any]) -> _Kind:
    notes = []
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") == "NFC":
        # Qwen2's tokenizer.json composes characters first; llama.cpp (and its converter) skip that.
        notes.append("tokenizer.json's NFC normalizer is not stored (llama.cpp has none): text that is not "
                     "already in NFC form may tokenize differently from the original")
    elif normalizer:
        raise TokenizerConversionError(f"tokenizer.json's normalizer {_describe(normalizer)} has no GGUF equivalent")
    splits, ignore_merges = _byte_level_splits(spec.get("pre_tokenizer")), bool(spec["model"].get("ignore_merges"))
    name = gguf_pre_tokenizer_name(splits, ignore_merges)
    if name is None:
        rule = " then ".join(f"Split({s!r})" for s in splits) or "no split"
        raise TokenizerConversionError(
            f"tokenizer.json's pre-tokenizer ({rule}{', ignore_merges' if ignore_merges else ''}) is none of "
            f"those llama.cpp knows by name ({', '.join(known_pre_tokenizer_names())}), so no GGUF reader "
            "would split words the way this vocabulary was trained"
        )
    return _Kind("gpt2", {K.PRE: name}, tuple(notes))


def _byte_level_splits(pre_tokenizer: dict[str, Any] | None) -> tuple[str, ...]:
    """The regexes a byte-level pre-tokenizer splits words with, in order; ByteLevel must come last."""
    steps = _steps(pre_tokenizer, "pretokenizers")
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise TokenizerConversionError(
            f"tokenizer.json's pre-tokenizer {_describe(pre_tokenizer)} does not end in ByteLevel, "
            "though its BPE has no byte fallback; Quill cannot tell how it maps bytes to tokens"
        )
    splits = []
    for step in steps[:-1]:
        pattern = step.get("pattern") or {}
        if step.get("type") == "Split" and "Regex" in pattern and step.get("behavior") == "Isolated" \
                and not step.get("invert"):
            splits.append(pattern["Regex"])
        elif step.get("type") == "Digits" and step.get("individual_digits"):
            splits.append(r"\p{N}")
        else:
            raise TokenizerConversionError(
                f"tokenizer.json's pre-tokenizer step {_describe(step)} has no llama.cpp equivalent")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        raise TokenizerConversionError("tokenizer.json's ByteLevel adds a prefix space, which llama.cpp never does")
    if byte_level.get("use_regex", True):
        splits.append(GPT2_SPLIT)
    return tuple(splits)


def _sentencepiece_kind(spec: dict[str, Any]) -> _Kind:
    """SentencePiece-style: spaces become "▁" (after an optional leading one) and BPE runs on the
    whole text. GGUF says only whether the leading "▁" is added (`add_space_prefix`)."""
    normalizer, pre_tokenizer = spec.get("normalizer"), spec.get("pre_tokenizer")
    if pre_tokenizer is None:  # Llama 2 (legacy) and Gemma: [Prepend("▁")], Replace(" ", "▁")
        steps = [(s.get("type"), s.get("prepend") or s.get("content"), (s.get("pattern") or {}).get("String"))
                 for s in _steps(normalizer, "normalizers")]
        prefix = steps[:1] == [("Prepend", _SPACE, None)]
        if steps[prefix:] == [("Replace", _SPACE, " ")]:
            return _Kind("llama", {K.ADD_PREFIX: prefix})
    elif normalizer is None and pre_tokenizer.get("type") == "Metaspace" and not pre_tokenizer.get("split") \
            and pre_tokenizer.get("replacement") == _SPACE:
        scheme = pre_tokenizer.get("prepend_scheme", "always")
        if scheme == "never":
            return _Kind("llama", {K.ADD_PREFIX: False})
        # llama.cpp prefixes every run of text at the start or after a special token, even one that
        # starts with a space; Metaspace skips a run that starts with a space, and "first" also
        # every run after the first.
        where = "text that starts with a space" + (" or follows a special token" if scheme == "first" else "")
        note = (f"tokenizer.json adds its leading '▁' with Metaspace({scheme}); GGUF readers add it as "
                f"SentencePiece does, which differs for {where}")
        return _Kind("llama", {K.ADD_PREFIX: True}, (note,), exact_after_specials=scheme != "first",
                     exact_leading_space=False)
    raise TokenizerConversionError(
        f"tokenizer.json's normalizer {_describe(normalizer)} and pre-tokenizer {_describe(pre_tokenizer)} are "
        "not SentencePiece's (spaces replaced by '▁', optionally one in front), the only form GGUF describes "
        "for a vocabulary with byte fallback"
    )


def _describe(node: dict[str, Any] | None) -> str:
    return "none" if node is None else json.dumps(node, ensure_ascii=False)[:200]


# -- the vocabulary -----------------------------------------------------------------------------------


def _token_table(spec: dict[str, Any], vocab_size: int, *, sentencepiece: bool) -> tuple[list[str], list[int]]:
    """Every id's token text and llama.cpp token type, padded to the model's vocabulary size."""
    model = spec["model"]
    texts = {index: token for token, index in model["vocab"].items()}
    added = {token["id"]: token for token in spec.get("added_tokens") or []}
    texts.update((index, token["content"]) for index, token in added.items())
    size = max(texts) + 1
    if size > vocab_size:
        raise TokenizerConversionError(
            f"tokenizer.json has ids up to {size - 1}, but the model's embedding has only {vocab_size} rows")
    tokens, types = [], []
    for index in range(vocab_size):
        text = texts.get(index)
        if text is None:  # as llama.cpp's converter pads: never produced, never matched
            tokens.append(f"[PAD{index}]")
            types.append(int(T.UNUSED))
            continue
        kind = _token_type(text, added.get(index), model, sentencepiece)
        if kind == T.USER_DEFINED and sentencepiece:
            text = text.replace(_SPACE, " ")  # llama.cpp matches user-defined pieces in the raw text
        tokens.append(text)
        types.append(int(kind))
    seen: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if seen.setdefault(token, index) != index:
            raise TokenizerConversionError(
                f"token {token!r} has ids {seen[token]} and {index}; llama.cpp refuses a vocabulary with duplicates")
    return tokens, types


def _token_type(text: str, added: dict[str, Any] | None, model: dict[str, Any], sentencepiece: bool) -> T:
    if sentencepiece and text == model.get("unk_token"):
        return T.UNKNOWN
    if added is not None:
        return T.CONTROL if added.get("special") else T.USER_DEFINED
    if sentencepiece and _BYTE_TOKEN.fullmatch(text):
        return T.BYTE
    return T.NORMAL


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.json's merges, best first; either format ("a b" strings or [a, b] pairs)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def _piece_scores(tokens: list[str], token_types: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """SentencePiece scores that reproduce the merge order: llama.cpp (and Quill's reader) merge the
    adjacent pair whose result scores best, so a piece scores by the first merge that makes it.
    Pieces no merge makes score below all others; scores of single characters, bytes and special
    tokens are never compared."""
    rank: dict[str, int] = {}
    for position, (left, right) in enumerate(merges):
        rank.setdefault(left + right, position)
    unreachable = -float(len(merges) + 1)
    scores = []
    for index, (token, kind) in enumerate(zip(tokens, token_types)):
        if token in rank:
            scores.append(-float(rank[token] + 1))
        elif kind == T.NORMAL and len(token) > 1:
            scores.append(unreachable - index)
        else:
            scores.append(0.0)
    return scores


# -- special tokens, flags, template -----------------------------------------------------------------


def _special_ids(special: gguf.SpecialVocab, spec: dict[str, Any], tokens: list[str]) -> dict[str, int]:
    """BOS, EOS, UNK, PAD, ... ids as llama.cpp's converter finds them (tokenizer_config.json, then
    config.json). A SentencePiece vocabulary's unknown piece is its UNK even where no config names it."""
    ids = {_SPECIAL_ID_KEYS[kind]: token_id for kind, token_id in special.special_token_ids.items()
           if kind in _SPECIAL_ID_KEYS}
    unk = spec["model"].get("unk_token")
    if K.UNK_ID not in ids and unk in tokens:
        ids[K.UNK_ID] = tokens.index(unk)
    return ids


def _add_flags(reference: Tokenizer, bos: int | None, eos: int | None) -> dict[str, bool]:
    """add_bos_token / add_eos_token from what the directory's tokenizer actually adds to a text
    (its post-processor, or tokenizer_config.json's flags that override it)."""
    around = reference.backend.encode("").ids
    add_bos = bos is not None and around[:1] == [bos]
    add_eos = eos is not None and around[int(add_bos):] == [eos]
    if around != [bos] * add_bos + [eos] * add_eos:
        raise TokenizerConversionError(
            f"the tokenizer adds {reference.convert_ids_to_tokens(around)} around every text; GGUF can only "
            f"say whether to add BOS ({_name(reference, bos)}) and EOS ({_name(reference, eos)})"
        )
    return {K.ADD_BOS: add_bos, K.ADD_EOS: add_eos}


def _name(reference: Tokenizer, token_id: int | None) -> str:
    return "none" if token_id is None else repr(reference.backend.id_to_token(token_id))


def _keep_end_of_generation_ids(metadata: dict[str, Any], reference: Tokenizer, rebuilt: Tokenizer) -> Tokenizer:
    """Keep the directory's extra stop ids (generation_config.json) that GGUF readers would not find
    by themselves, as llama.cpp's end-of-turn (eot) and end-of-message (eom) ids."""
    missing = sorted(reference.eos_token_ids - rebuilt.eos_token_ids)
    if not missing:
        return rebuilt
    if len(missing) > 2:
        raise TokenizerConversionError(
            f"the model stops on {len(missing)} ids GGUF has no place for ({missing}); it keeps two at most")
    metadata.update(zip((K.EOT_ID, K.EOM_ID), missing))
    return Tokenizer.from_gguf_metadata(metadata)


# -- the end-to-end check ----------------------------------------------------------------------------


def _verify(metadata: dict[str, Any], reference: Tokenizer, spec: dict[str, Any], kind: _Kind,
            directory: Path) -> None:
    """The tokenizer rebuilt from the metadata must encode like the directory's own (and stop on the
    same ids: the metadata gains eot/eom ids where that needs them)."""
    rebuilt = _keep_end_of_generation_ids(metadata, reference, Tokenizer.from_gguf_metadata(metadata))
    texts = [CHECK_TEXT] + (
        [f"x {token} y{token}\n{token}z" for token in (t["content"] for t in spec.get("added_tokens") or [])]
        if kind.exact_after_specials else []
    )
    if kind.exact_leading_space:
        texts.append(" " + CHECK_TEXT)
    for text in texts:
        for add_special in (True, False):
            expected, actual = reference.encode(text, add_special), rebuilt.encode(text, add_special)
            if actual != expected:
                first = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b),
                             min(len(actual), len(expected)))
                raise TokenizerConversionError(
                    f"the GGUF form of {directory / 'tokenizer.json'} does not tokenize like it: {text[:60]!r}... "
                    f"differs from token {first} on ({reference.convert_ids_to_tokens(expected[first:first + 4])} "
                    f"expected, {rebuilt.convert_ids_to_tokens(actual[first:first + 4])} from the GGUF form)"
                )
    if rebuilt.eos_token_ids != reference.eos_token_ids:
        raise TokenizerConversionError(
            f"the GGUF form stops on ids {sorted(rebuilt.eos_token_ids)}, "
            f"the directory on {sorted(reference.eos_token_ids)}")
