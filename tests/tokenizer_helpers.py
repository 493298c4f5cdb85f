"""Tokenizers shared by the tokenizer, chat-template, detokenizer and GGUF-writer tests.

The real models' tokenizers are slow to build (Gemma's vocabulary has 262,144 tokens: ~10 s for
Quill, ~20 s for transformers), so each is built once per test session, whichever test module asks
first. The Hugging Face tokenizer directories below are trained here in milliseconds, on a small
corpus, in the shapes real checkpoints ship (Llama 3, Qwen2 and GPT-2 byte-level BPE; Llama 2 and
Gemma SentencePiece BPE with byte fallback).
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from quill.tokenizer import Tokenizer, load_tokenizer


@lru_cache(maxsize=None)
def quill_tokenizer(gguf_path: Path) -> Tokenizer:
    return load_tokenizer(gguf_path)


@lru_cache(maxsize=None)
def reference_tokenizer(gguf_path: Path):
    """transformers' own tokenizer for the same GGUF file: the reference Quill must match."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def tiny_sentencepiece_metadata(**overrides):
    """A Llama-style SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces."""
    pieces = ["▁", "H", "e", "l", "o", "w", "r", "d", "▁H", "▁He", "ll", "llo", "▁Hello", "▁w", "or", "▁wor", "ld", "▁world", "  "]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 1) + [4]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        **overrides,
    }


def tiny_text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` in the tiny SentencePiece vocabulary one byte at a time, exactly (no space put in
    front, as encoding would): the single-letter piece where there is one ("▁" for a space), else
    the byte token (<0x00> is id 3). Grammar matchers accept one token per byte string: the piece,
    not its <0xNN> fallback."""
    pieces = {chr(byte): tokenizer.backend.token_to_id(chr(byte)) for byte in range(128)} | {" ": 259}
    return [pieces.get(chr(byte)) or 3 + byte for byte in text.encode()]


# -- Hugging Face tokenizer directories, trained here: the two kinds a GGUF file can carry ----------

# What the tokenizers are trained on: enough English, code, digits and other scripts that BPE learns
# merges of every sort (words, spaces before words, digit runs, punctuation runs).
CORPUS = """The quick brown fox jumps over the lazy dog. It's the dog's bone, isn't it? We'll see.
I've been told he's there; they're sure you'd like some tea. DON'T SHOUT, IT'S LATE!
def main(argv):
    for index, value in enumerate(argv):
        if value == "--help":
            return print("usage: main [--help]")
    return 0
Numbers: 1 22 333 4444 55555 3.14159 2,718 1e-9 100% $42.00 12:30 2024-01-31
Café naïve résumé façade Ångström über straße. Ελληνικά κείμενο. Русский текст здесь.
中文文本测试，日本語のテキスト。 한국어 텍스트입니다.
<html><body><table><tr><td>cell</td></tr></table></body></html>
    indented    text    with    runs   of   spaces
tabs\tseparate\tcolumns\tof\tvalues
emoji 😀 🎉 👍 and symbols © ® ™ → ← ≠ ≤ ≥ ½ ²
""" * 3

# The regexes of real tokenizer.json files, copied from them (not from Quill, which must recognise them).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The pre-tokenizers of real byte-level vocabularies, as their tokenizer.json spells them.
BYTE_LEVEL_PRE_TOKENIZERS = {
    "llama-bpe": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "qwen2": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]),
}

# Byte-level spellings of " zebra" and " quickest": words no merge builds (see write_byte_level_bpe).
WHOLE_WORDS = ("Ġzebra", "Ġquickest")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ turn_start }}{{ message['role'] }}\n"
    "{{ message['content'] }}{{ turn_end }}\n{% endfor %}{% if add_generation_prompt %}{{ turn_start }}assistant\n"
    "{% endif %}"
)


def _chat_template(turn_start: str, turn_end: str) -> str:
    return CHAT_TEMPLATE.replace("{{ turn_start }}", turn_start).replace("{{ turn_end }}", turn_end)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def _point_config_at(directory: Path, tokenizer: BackendTokenizer, bos: str | None, eos: str) -> None:
    """A real checkpoint's config.json names its tokenizer's BOS/EOS ids; the tiny models' do not."""
    config = json.loads((directory / "config.json").read_text())
    config.update(bos_token_id=tokenizer.token_to_id(bos) if bos else None, eos_token_id=tokenizer.token_to_id(eos))
    config.pop("pad_token_id", None)
    _write_json(directory / "config.json", config)


def write_byte_level_bpe(directory: Path, pre: str, vocab_size: int = 500) -> Path:
    """A byte-level BPE tokenizer (GPT-2 / Llama 3 / Qwen2 style) trained on CORPUS, saved with its
    tokenizer_config.json (chat template) into `directory` (a model directory: its config.json is
    pointed at the tokenizer's BOS/EOS). Llama 3 style adds BOS and skips merges for whole words."""
    llama3 = pre == "llama-bpe"
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = BYTE_LEVEL_PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    spec = json.loads(tok.to_str())
    if llama3:
        # Llama 3 emits a word that is itself a token whole ("ignore_merges"), and its vocabulary
        # has such words that no merge sequence reaches: a tokenizer without that rule splits them.
        spec["model"]["ignore_merges"] = True
        vocab = spec["model"]["vocab"]
        vocab.update({word: len(vocab) + i for i, word in enumerate(WHOLE_WORDS)})
    tok = BackendTokenizer.from_str(json.dumps(spec))
    bos, eos = ("<|begin_of_text|>", "<|end_of_text|>") if llama3 else (None, "<|im_end|>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                            ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|stop|>")])
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    if llama3:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", {
        "bos_token": bos, "eos_token": eos, "chat_template": _chat_template("<|im_start|>", "<|im_end|>")})
    # Llama 3 style: generation also stops on an end-of-turn token no GGUF reader knows by name.
    _write_json(directory / "generation_config.json",
                {"eos_token_id": [tok.token_to_id(eos)] + ([tok.token_to_id("<|stop|>")] if llama3 else [])})
    _point_config_at(directory, BackendTokenizer.from_file(str(directory / "tokenizer.json")), bos, eos)
    return directory


def _sentencepiece_merges(vocab: dict[str, int], pieces: list[str]) -> list[tuple[str, str]]:
    """Merges as transformers' SentencePiece converter derives them: every split of every piece into two
    pieces, best piece first, longer left part first."""
    merges = []
    for piece in pieces:
        splits = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))]
        splits = [(left, right) for left, right in splits if left in vocab and right in vocab]
        merges += sorted(splits, key=lambda pair: (-len(pair[0]), -len(pair[1])))
    return merges


def write_sentencepiece_bpe(directory: Path, add_space_prefix: bool, vocab_size: int = 500) -> Path:
    """A SentencePiece-style BPE tokenizer with byte fallback, as transformers converts one: Llama 2
    style (`add_space_prefix`: "<unk> <s> </s>", a "▁" in front of the text) or Gemma style (no prefix,
    "<pad> <eos> <bos> <unk>", turn tokens and a user-defined "<table>"), then the 256 byte tokens, then
    the pieces trained on CORPUS in score order."""
    # Train on words ("▁" + word, as SentencePiece splits on whitespace) to learn realistic pieces.
    trainer_tok = BackendTokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer_tok.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=vocab_size - 270,
                                                                             show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    chars = [t for t in sorted(trained["vocab"], key=trained["vocab"].get) if len(t) == 1]
    merged = [left + right for left, right in (m if isinstance(m, list) else m.split(" ") for m in trained["merges"])]
    if add_space_prefix:
        specials, user_defined, bos, eos, unk = ["<unk>", "<s>", "</s>"], [], "<s>", "</s>", "<unk>"
        turn = ("[INST] ", " [/INST]")
    else:
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        user_defined, bos, eos, unk = ["<table>"], "<bos>", "<eos>", "<unk>"
        turn = ("<start_of_turn>", "<end_of_turn>")
    pieces = chars + [p for p in dict.fromkeys(merged) if p not in chars]
    tokens = specials + user_defined + [f"<0x{b:02X}>" for b in range(256)] + pieces
    vocab = {token: index for index, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=_sentencepiece_merges(vocab, pieces), unk_token=unk, byte_fallback=True,
                     fuse_unk=True)
    tok = BackendTokenizer(bpe)
    escape = [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] + escape if add_space_prefix else escape)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    tok.save(str(directory / "tokenizer.json"))
    # Newer transformers keep the template beside the config.
    (directory / "chat_template.jinja").write_text(_chat_template(*turn), encoding="utf-8")
    _write_json(directory / "tokenizer_config.json",
                {"bos_token": bos, "eos_token": eos, "unk_token": unk, "add_bos_token": True, "add_eos_token": False})
    _point_config_at(directory, tok, bos, eos)
    return directory


TOKENIZER_KINDS = {
    # model family -> {kind: writer}; each family gets the tokenizers of its real checkpoints where
    # it has them (Llama 3 / Llama 2, Qwen2, Gemma) and a plain one of the other kind.
    "llama": {"bpe": lambda d: write_byte_level_bpe(d, "llama-bpe"), "spm": lambda d: write_sentencepiece_bpe(d, True)},
    "qwen2": {"bpe": lambda d: write_byte_level_bpe(d, "qwen2"), "spm": lambda d: write_sentencepiece_bpe(d, True)},
    "gemma3": {"bpe": lambda d: write_byte_level_bpe(d, "gpt-2"), "spm": lambda d: write_sentencepiece_bpe(d, False)},
}


def random_texts(count: int, seed: int, specials: list[str]) -> list[str]:
    """`count` random strings of words, unicode, whitespace runs, digits, punctuation and special
    token texts (a fixed seed, so every run checks the same strings)."""
    rng = random.Random(seed)
    words = sorted(set(CORPUS.split()))
    atoms = (
        [" ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n", "\u00a0", "\u200b", "\u3000"]
        + ["0", "7", "42", "1234", "3.14", "1,000", "٣", "½", "²"]
        + ["'s", "'LL", "'re", "...", "!!", "?", "--", "==", "{", "}", "()", '"', "```"]
        + ["é", "ß", "中文", "日本語", "😀", "👩\u200d👩\u200d👧", "🇫🇷", "Ελληνικά", "ǅ", "e\u0301", "𝔘"]
        + [" zebra", " quickest", "zebra"]
        + specials
    )
    texts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(1, 12)):
            roll = rng.random()
            if roll < 0.45:
                pieces.append(rng.choice(words))
            elif roll < 0.9:
                pieces.append(rng.choice(atoms))
            else:  # any character at all, most of them outside the vocabulary
                pieces.append(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF),
                                              rng.randint(0x4E00, 0x9FFF), rng.randint(0x1F300, 0x1F64F)])))
        texts.append("".join(pieces))
    return texts
