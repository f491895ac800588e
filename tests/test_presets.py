"""Model presets: the chunk-package assembly and its pinned hash, and the Qwen2.5-Coder
preset end to end (a second real architecture, qwen2 with grouped-query attention)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sage.errors import SageError
from sage.presets import PRESETS, Preset, _chunked_file, assemble_chunks, preset_status, resolve_model


def fake_chunks(tmp_path: Path, monkeypatch, data: list[bytes]) -> Preset:
    """Chunk packages laid out as the real ones (PACKAGE/data/part0N.bin), on sys.path."""
    site = tmp_path / "site"
    names = []
    for i, blob in enumerate(data, 1):
        pkg = site / f"fake_chunks_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('sage must locate chunks without importing them')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
        names.append(pkg.name)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SAGE_HOME")  # the platform's cache dir (with SAGE_HOME: test_models.py)
    whole = hashlib.sha256(b"".join(data)).hexdigest()
    return Preset("fake", "a fake chunked model", filename="fake.gguf", chunks=tuple(names), sha256=whole)


def test_chunks_are_joined_once_and_checked(tmp_path, monkeypatch):
    data = [b"GGUF" + bytes(range(256)) * 50, b"\x01" * 12345, b"tail"]
    preset = fake_chunks(tmp_path, monkeypatch, data)
    assert preset_status(preset) == "installed; assembled on first use"
    path = _chunked_file(preset)
    assert path.read_bytes() == b"".join(data)
    assert path.parent == tmp_path / "cache" / "sage" / "models"
    assert preset_status(preset) == str(path)
    before = path.stat().st_mtime_ns
    assert _chunked_file(preset) == path and path.stat().st_mtime_ns == before  # not joined again


def test_a_mismatched_hash_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    preset = fake_chunks(tmp_path, monkeypatch, [b"GGUF", b"altered"])
    bad = Preset(preset.name, preset.description, filename=preset.filename, chunks=preset.chunks, sha256="0" * 64)
    with pytest.raises(SageError, match="do not join to the pinned file") as e:
        _chunked_file(bad)
    assert "\n" not in str(e.value)
    models = tmp_path / "cache" / "sage" / "models"
    assert list(models.iterdir()) == []  # no partial or temp file
    with pytest.raises(SageError, match="pinned"):
        assemble_chunks([tmp_path / "site" / "fake_chunks_part1" / "data" / "part01.bin"], models / "x.gguf",
                        "1" * 64, "x")


def test_missing_chunk_packages(tmp_path, monkeypatch):
    preset = Preset("gone", "", filename="gone.gguf", chunks=("no_such_chunk_part1",), sha256="0" * 64)
    assert preset_status(preset) is None and _chunked_file(preset) is None
    monkeypatch.setitem(PRESETS, "gone", preset)
    with pytest.raises(SageError, match="make install"):
        resolve_model("gone")


QWEN = PRESETS["qwen2.5-coder-0.5b"]
qwen_installed = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(p) is None for p in QWEN.chunks),
    reason="the Qwen2.5-Coder chunk packages are not installed (make install installs them)",
)


@pytest.mark.slow
@qwen_installed
def test_qwen_preset_assembles_to_the_pinned_gguf():
    path = resolve_model("qwen2.5-coder-0.5b").path
    assert path.stat().st_size == 491_400_064
    import gguf

    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert r.fields["qwen2.attention.head_count"].contents() == 14
    assert r.fields["qwen2.attention.head_count_kv"].contents() == 2


@pytest.mark.slow
@qwen_installed
def test_qwen_ask_end_to_end(run_sage):
    """sage ask on Qwen2.5-Coder with tracking (GQA 14/2), the analysis and a rollout."""
    r = run_sage("ask", "What is 12 + 30? Answer briefly.", "--model", "qwen2.5-coder-0.5b", "--max-tokens", "40",
                 "--max-decisions", "1", "--alternatives", "1", "--json", timeout=900)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["model"]["architecture"] == "qwen2" and d["tokens"]
    a = d["analysis"]
    assert a["tracker"] == "native" and len(a["tracked_layers"]) >= 1
    # --max-decisions caps the forks; the candidates that were checked and cleared stay listed
    assert sum(x["confirmed"] for x in a["decisions"]) <= 1 and all(len(x["branches"]) <= 1 for x in a["decisions"])
    shown = run_sage("explain", "--tree")
    assert shown.returncode == 0, shown.stderr
