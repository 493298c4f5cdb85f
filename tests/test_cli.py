"""The `quill` command, with a fake LLM in place of the engine (end-to-end runs live elsewhere)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from quill import cli
from quill.cli import common
from quill.errors import ModelLoadError
from quill.outputs import RequestMetrics, RequestOutput
from quill.sampling_params import SamplingParams
from quill.weights import hub

DELTAS = ["Hel", "lo", ", wor", "ld"]


class FakeTokenizer:
    def __init__(self, chat_template: str | None) -> None:
        self.chat_template = chat_template


class FakeLLM:
    """Streams DELTAS for every request and records what it was asked."""

    def __init__(self, chat_template: str | None = "{{ messages }}") -> None:
        self.tokenizer = FakeTokenizer(chat_template)
        self.calls: list[tuple[str, object, SamplingParams]] = []
        self.templates: list[str | None] = []  # chat_template passed to each stream_chat

    def stream(self, prompt, params=None):
        self.calls.append(("stream", prompt, params))
        return self._outputs()

    def stream_chat(self, messages, params=None, chat_template=None):
        self.calls.append(("stream_chat", [dict(m) for m in messages], params))
        self.templates.append(chat_template)
        return self._outputs()

    def _outputs(self):
        metrics = RequestMetrics(arrival_time=0.0, first_token_time=0.05, last_token_time=0.35,
                                 finished_time=0.35, num_generated_tokens=len(DELTAS))
        text = ""
        for i, delta in enumerate(DELTAS):
            text += delta
            last = i == len(DELTAS) - 1
            yield RequestOutput("r0", [1, 2, 3], list(range(i + 1)), text, delta, last,
                                "length" if last else None, metrics)


@pytest.fixture
def fake_llm(monkeypatch) -> FakeLLM:
    llm = FakeLLM()
    monkeypatch.setattr(common, "load_llm", lambda args: llm)
    return llm


OPTIONS = {
    "pull": ["NAME", "--quiet", "smollm2", "gemma3"],
    "models": ["QUILL_HOME"],
    "run": ["prompt", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--chat", "--no-chat",
            "--chat-template", "--system", "--dtype"],
    "chat": ["model", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--chat-template",
             "--system", "/reset", "/exit"],
}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for option in OPTIONS[command]:
        assert option in out, option


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in OPTIONS)


def test_models_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUILL_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    writer = gguf.GGUFWriter(str(tmp_path / "models" / hub.KNOWN_MODELS["smollm2"].filename), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert cli.main(["models"]) == 0
    header, row, hint = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "ARCHITECTURE", "SIZE", "PATH"]
    name, architecture, size, unit, path = row.split()
    assert (name, architecture) == ("smollm2", "llama") and unit in ("B", "KiB")
    assert path == str(tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "gemma3" in hint


def test_models_when_cache_is_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUILL_HOME", str(tmp_path))
    assert cli.main(["models"]) == 0
    assert "No models in" in capsys.readouterr().out


def test_pull_prints_paths(monkeypatch, capsys, tmp_path):
    pulled = []
    monkeypatch.setattr(hub, "pull", lambda name, progress: pulled.append((name, progress)) or tmp_path / name)
    assert cli.main(["pull", "smollm2", "gemma3", "-q"]) == 0
    assert pulled == [("smollm2", False), ("gemma3", False)]
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "smollm2"), str(tmp_path / "gemma3")]


def test_run_streams_deltas_in_order(fake_llm, capsys, monkeypatch):
    written = []
    monkeypatch.setattr(cli.sys.stdout, "write", lambda text: written.append(text) or len(text))
    assert cli.main(["run", "smollm2", "Say hello", "--temperature", "0", "--max-tokens", "4"]) == 0
    assert written == DELTAS + ["\n"]
    stats = capsys.readouterr().err
    assert "TTFT 50 ms" in stats and "decode 10.0 tok/s" in stats and "in 3, out 4" in stats
    kind, messages, params = fake_llm.calls[0]
    assert kind == "stream_chat" and messages == [{"role": "user", "content": "Say hello"}]
    assert params.temperature == 0.0 and params.max_tokens == 4


def test_run_without_template_completes_plain_text(monkeypatch, capsys):
    llm = FakeLLM(chat_template=None)
    monkeypatch.setattr(common, "load_llm", lambda args: llm)
    assert cli.main(["run", "gemma3", "The capital of France is"]) == 0
    assert llm.calls[0][:2] == ("stream", "The capital of France is")
    assert capsys.readouterr().out == "Hello, world\n"


def test_run_no_chat_and_system(fake_llm):
    assert cli.main(["run", "m", "raw", "--no-chat"]) == 0
    assert cli.main(["run", "m", "hi", "--system", "Be brief."]) == 0
    assert fake_llm.calls[0][:2] == ("stream", "raw")
    assert fake_llm.calls[1][1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("argv, message", [
    (["run", "gemma3", "hi", "--chat"], "has no chat template; pass one with --chat-template FILE"),
    (["chat", "gemma3"], "has no chat template; pass one with --chat-template FILE"),
    (["run", "gemma3", "hi", "--system", "x"], "--system needs chat mode"),
])
def test_chat_without_template_is_a_clear_error(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_llm", lambda args: FakeLLM(chat_template=None))
    assert cli.main(argv) == 2
    assert f"{message}" in capsys.readouterr().err


def test_chat_template_file_enables_chat(monkeypatch, tmp_path):
    llm = FakeLLM(chat_template=None)
    monkeypatch.setattr(common, "load_llm", lambda args: llm)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    monkeypatch.setattr("builtins.input", lambda prompt: "/exit")
    assert cli.main(["run", "gemma3", "hi", "--chat-template", str(template)]) == 0
    assert cli.main(["chat", "gemma3", "--chat-template", str(template)]) == 0
    assert llm.calls[0][0] == "stream_chat" and llm.templates == [template.read_text()]


def test_quill_errors_print_message_and_exit_2(monkeypatch, capsys):
    def fail(args):
        raise ModelLoadError("no model called 'x'")

    monkeypatch.setattr(common, "load_llm", fail)
    assert cli.main(["run", "x", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == "error: no model called 'x'\n"


def test_invalid_sampling_value_exits_2(fake_llm, capsys):
    assert cli.main(["run", "m", "hi", "--top-p", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: top_p must be in (0, 1]")


def test_unreadable_chat_template_exits_2(capsys, tmp_path):
    assert cli.main(["run", "m", "hi", "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    assert "error: cannot read chat template" in capsys.readouterr().err
    (tmp_path / "binary.jinja").write_bytes(b"\xff\xfe{{ x }}")
    assert cli.main(["run", "m", "hi", "--chat-template", str(tmp_path / "binary.jinja")]) == 2
    assert "error: cannot read chat template" in capsys.readouterr().err
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }")  # said before serving, not per request
    assert cli.main(["serve", "m", "--chat-template", str(tmp_path / "broken.jinja")]) == 2
    assert "is not valid Jinja2 (line 1)" in capsys.readouterr().err


def test_an_empty_chat_template_is_refused_rather_than_replaced_by_the_models(fake_llm, capsys, tmp_path):
    (tmp_path / "empty.jinja").write_text("  \n")
    for command in (["run", "m", "hi"], ["chat", "m"]):
        assert cli.main([*command, "--chat-template", str(tmp_path / "empty.jinja")]) == 2
        assert "is empty" in capsys.readouterr().err
    assert fake_llm.calls == []


def test_chat_keeps_history_and_resets(fake_llm, monkeypatch, capsys):
    lines = iter(["Hi", "", "And you?", "/reset", "Again", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    assert cli.main(["chat", "smollm2", "--system", "Be kind."]) == 0
    system = {"role": "system", "content": "Be kind."}
    assert [messages for _, messages, _ in fake_llm.calls] == [
        [system, {"role": "user", "content": "Hi"}],
        [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, world"},
         {"role": "user", "content": "And you?"}],
        [system, {"role": "user", "content": "Again"}],
    ]
    captured = capsys.readouterr()
    assert captured.out == "Hello, world\n" * 3
    assert captured.err.count("TTFT") == 3 and "conversation cleared" in captured.err


def test_chat_commands_never_reach_the_model(fake_llm, monkeypatch, capsys):
    """A mistyped command is reported, not sent; // sends a message that starts with /."""
    lines = iter(["/rest", "/RESET", "//etc is a folder", "/EXIT", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    assert cli.main(["chat", "smollm2"]) == 0
    assert [messages for _, messages, _ in fake_llm.calls] == [[{"role": "user", "content": "/etc is a folder"}]]
    err = capsys.readouterr().err
    assert "unknown command '/rest'" in err and "conversation cleared" in err


def test_chat_ends_on_eof(fake_llm, monkeypatch):
    def eof(prompt):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert cli.main(["chat", "smollm2"]) == 0
    assert fake_llm.calls == []


@pytest.mark.parametrize("text, size", [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000),
                                        ("4096", 4096)])
def test_kv_cache_memory_sizes(text, size):
    assert common.byte_size(text) == size


@pytest.mark.parametrize("text", ["lots", "12XB", "-1GiB", "0"])
def test_bad_kv_cache_memory_is_rejected(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        common.byte_size(text)


def test_batching_limits_reach_the_engine_config():
    args = cli.build_parser().parse_args(["serve", "smollm2", "--max-num-seqs", "8", "--max-num-batched-tokens", "2048"])
    options = common.llm_options(args)
    assert (options["max_num_seqs"], options["max_num_batched_tokens"]) == (8, 2048)
    defaults = common.llm_options(cli.build_parser().parse_args(["serve", "smollm2"]))
    from quill.config import EngineConfig
    assert (defaults["max_num_seqs"], defaults["max_num_batched_tokens"]) == (EngineConfig.max_num_seqs,
                                                                              EngineConfig.max_num_batched_tokens)


@pytest.mark.parametrize("flag", ["--max-num-seqs", "--max-num-batched-tokens"])
def test_batching_limits_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["serve", "smollm2", flag, "0"])
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--port", "70000"), ("--max-queue", "0"), ("--shutdown-grace", "-1"),
                                           ("--stream-idle-timeout", "-1"), ("--request-timeout", "0"),
                                           ("--hourly-cost", "-1"), ("--response-cache-entries", "0")])
def test_serve_refuses_bad_limits_before_loading_the_model(monkeypatch, capsys, option, value):
    monkeypatch.setattr(common, "load_llm", lambda args: pytest.fail("the model was loaded"))
    assert cli.main(["serve", "m", option, value]) == 2
    assert f"error: {option} must be" in capsys.readouterr().err
