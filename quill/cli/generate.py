"""`quill run` and `quill chat`: answer one prompt, or chat in the terminal, streaming each answer
with a stats line (TTFT, decode speed, tokens) on stderr."""
from __future__ import annotations

import argparse
import sys
from contextlib import closing
from pathlib import Path
from typing import Iterator, TextIO

from quill.cli import common
from quill.errors import ChatTemplateError, InvalidRequestError, QuillError
from quill.outputs import RequestOutput
from quill.sampling_params import SamplingParams


def add_commands(commands) -> None:
    """Add `run` and `chat` to the `quill` subcommands."""
    run = commands.add_parser(
        "run",
        parents=[common.model_options(), _chat_options(), _sampling_options()],
        help="answer one prompt, streaming to stdout",
        description="Answer one prompt and stream the answer to stdout; a stats line goes to stderr. "
        "The prompt goes through the model's chat template when it has one, else it is completed as plain text.",
    )
    run.add_argument("prompt", help="the prompt (a user message in chat mode, raw text otherwise)")
    run.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="force (--chat) or skip (--no-chat) the chat template; default: use it if there is one")
    _add_structured_output_options(run)
    run.set_defaults(func=_cmd_run)

    chat = commands.add_parser(
        "chat",
        parents=[common.model_options(), _chat_options(), _sampling_options()],
        help="chat interactively with a model",
        description="Multi-turn chat in the terminal. Each answer streams, then TTFT, decode speed and token "
        "counts are shown on stderr. Type /reset to start over, /exit or Ctrl-D to quit (a message that starts "
        "with / is sent with // in front). "
        "Needs a chat template: the model's own, or --chat-template FILE.",
    )
    chat.set_defaults(func=_cmd_chat)


def _chat_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--system", metavar="TEXT", help="system message for chat mode")
    return options


def _sampling_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256, metavar="N",
                       help="most tokens to generate per answer (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=0.7, metavar="T",
                       help="0 means greedy (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=0.95, metavar="P",
                       help="nucleus sampling mass, 1 disables (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=40, metavar="K",
                       help="sample from the K most likely tokens, 0 disables (default: %(default)s)")
    group.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    return options


def _add_structured_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "structured output", "Constrain the answer token by token (at most one of these). The answer ends "
        "as soon as it is complete; one cut off by --max-tokens is incomplete (the stats line then says so).")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--json-schema", metavar="FILE",
                           help="answer with JSON that validates against the JSON Schema in FILE")
    exclusive.add_argument("--json-object", action="store_true", help="answer with any JSON object")
    exclusive.add_argument("--regex", metavar="REGEX",
                           help="answer with text that matches REGEX in full (Rust regex syntax; \\d and \\w are ASCII)")
    exclusive.add_argument("--choice", nargs="+", metavar="TEXT", help="answer with exactly one of these strings")
    exclusive.add_argument("--grammar", metavar="FILE",
                           help="answer with text the grammar in FILE accepts (Lark, as llguidance reads it, or GBNF)")


def _structured_output(args: argparse.Namespace) -> dict:
    """The SamplingParams constraint fields that `run`'s options ask for."""
    if getattr(args, "json_schema", None):
        return {"json_schema": _read_text(args.json_schema, "--json-schema")}
    if getattr(args, "grammar", None):
        return {"grammar": _read_text(args.grammar, "--grammar")}
    return {name: value for name in ("json_object", "regex", "choice") if (value := getattr(args, name, None))}


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {option} file {path}: {exc}") from exc


def _cmd_run(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    template = common.read_chat_template(args)
    llm = common.load_llm(args)
    use_chat = args.chat if args.chat is not None else bool(template or llm.tokenizer.chat_template)
    if use_chat:
        _require_chat_template(llm, template, args.model)
        messages = _system_messages(args) + [{"role": "user", "content": args.prompt}]
        stream = llm.stream_chat(messages, params, chat_template=template)
    elif args.system:
        raise InvalidRequestError("--system needs chat mode, but this prompt is completed as plain text")
    else:
        stream = llm.stream(args.prompt, params)
    final = _stream_answer(stream, sys.stdout)
    print(common.dim(_stats_line(final)), file=sys.stderr)
    return 0


CHAT_HELP = "Type /reset to start over, /exit or Ctrl-D to quit; start a message with // to send one beginning with /."


def _cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    template = common.read_chat_template(args)
    llm = common.load_llm(args)
    _require_chat_template(llm, template, args.model)
    messages = _system_messages(args)
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            text = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        command = text.lower() if text.startswith("/") and not text.startswith("//") else None
        if command == "/exit":
            return 0
        if command == "/reset":
            messages = _system_messages(args)
            print(common.dim("(conversation cleared)"), file=sys.stderr)
            continue
        if command is not None:  # a typo must not reach the model as a message
            print(f"unknown command {text.split()[0]!r}. {CHAT_HELP}", file=sys.stderr)
            continue
        text = text[1:] if text.startswith("//") else text
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            final = _stream_answer(llm.stream_chat(messages, params, chat_template=template), sys.stdout)
        except KeyboardInterrupt:
            # Ctrl-C stops this answer only; the turn is dropped so the history stays consistent.
            messages.pop()
            print(common.dim("\n(interrupted)"), file=sys.stderr)
            continue
        except QuillError as exc:
            # E.g. the conversation outgrew the context: report it and let the user /reset.
            messages.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": final.text})
        print(common.dim(_stats_line(final)), file=sys.stderr)


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, **_structured_output(args))


def _system_messages(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def _require_chat_template(llm, template: str | None, model: str) -> None:
    if template is None and llm.tokenizer.chat_template is None:
        raise ChatTemplateError(
            f"{model} has no chat template; pass one with --chat-template FILE"
            " (or use `quill run --no-chat` for plain completion)"
        )


def _stream_answer(stream: Iterator[RequestOutput], out: TextIO) -> RequestOutput:
    """Write each output's new text as it arrives and return the last output."""
    final = None
    with closing(stream):  # leaving early (Ctrl-C) closes the generator, which aborts the request
        for final in stream:
            out.write(final.delta)
            out.flush()
    if final is None:
        raise QuillError("the engine returned no output")
    if not final.text.endswith("\n"):
        out.write("\n")
    return final


def _stats_line(output: RequestOutput) -> str:
    metrics = output.metrics
    ttft = "n/a" if metrics.ttft is None else f"{metrics.ttft * 1000:.0f} ms"
    rate = metrics.decode_tokens_per_second
    decode = "n/a" if rate is None else f"{rate:.1f} tok/s"
    line = f"TTFT {ttft} | decode {decode} | tokens in {output.num_prompt_tokens}, out {output.num_completion_tokens}"
    return line + (" | hit --max-tokens" if output.finish_reason == "length" else "")

