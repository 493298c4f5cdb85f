"""Start a server to measure, wait until it answers, and stop it afterwards (SIGTERM)."""
from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from quill.errors import QuillError


class ServerStartError(QuillError):
    """A server that exited or never became ready."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def started_server(command: list[str], base_url: str, ready_path: str, log_path: Path,
                   timeout: float = 300.0) -> Iterator[subprocess.Popen]:
    """Run `command`, wait until `base_url + ready_path` answers 200, and stop it when done."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise ServerStartError(f"the server exited with status {process.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base_url + ready_path, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise ServerStartError(f"the server was not ready after {timeout:.0f} s; see {log_path}")
                time.sleep(0.5)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def peak_rss_mb(pid: int) -> float | None:
    """A process's peak resident memory so far (Linux's VmHWM), in MB; None where /proc has no such
    process or field (another OS)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def quill_serve_command(model: str, port: int, *options: str) -> list[str]:
    """`quill serve MODEL` on a loopback port, with a queue long enough for any benchmark level."""
    return [sys.executable, "-m", "quill.cli", "serve", model, "--port", str(port), "--max-queue", "4096", *options]


def llama_cpp_command(python: str, model_file: Path, port: int) -> list[str]:
    """llama-cpp-python's OpenAI server on two threads. By default it cancels the stream in
    progress when a new request arrives; --interrupt_requests False makes it queue them instead."""
    return [python, "-m", "llama_cpp.server", "--model", str(model_file), "--n_threads", "2",
            "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)]


def llama_server_slot_context(max_tokens: int, prompt_words: int) -> int:
    """Tokens of context for each llama-server slot: one client's prompt (~1.3 tokens a word, with
    room to spare) and answer, and at least the 1,024 of the issue's `-np 16 -c 16384`."""
    return max(1024, max_tokens + 64 + 2 * prompt_words)


def llama_server_command(binary: str, model_file: Path, port: int, clients: int, context_per_client: int = 1024) -> list[str]:
    """llama.cpp's own `llama-server` (build it with ../shared/peers/build-llama-server.sh) on two
    threads, with one parallel slot per client and room for each client's prompt and answer, as
    the issue measuring it ran it (-np 16 -c 16384)."""
    return [binary, "-m", str(model_file), "-t", "2", "-tb", "2", "-np", str(clients),
            "-c", str(clients * context_per_client), "--host", "127.0.0.1", "--port", str(port)]
