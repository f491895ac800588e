"""Where sage keeps its files, and the one way it writes them (a temp file and a rename).

The user data dir holds traces, bench results and trained heads; the cache dir holds
models assembled from chunk packages and downloaded from the hub. platformdirs knows each
platform's convention (XDG on Linux, ~/Library on macOS, %LOCALAPPDATA% on Windows);
$SAGE_HOME overrides both (the cache is then $SAGE_HOME/cache).
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import platformdirs

APP = "sage"


def sage_home() -> Path:
    """Where traces live: $SAGE_HOME, else the platform's user data dir."""
    env = os.environ.get("SAGE_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def heads_dir() -> Path:
    """Where `sage heads train` writes sidecars and labels by default."""
    return sage_home() / "heads"


def cache_dir() -> Path:
    """sage's cache (models joined from chunk packages, hub downloads): $SAGE_HOME/cache
    when $SAGE_HOME is set, else the platform's user cache dir ($XDG_CACHE_HOME/sage or
    ~/.cache/sage on Linux)."""
    env = os.environ.get("SAGE_HOME")
    if env:
        return Path(env).expanduser() / "cache"
    return Path(platformdirs.user_cache_dir(APP, appauthor=False))


def models_dir() -> Path:
    """The model files sage joins from pip packages (chunks), as FILE.gguf."""
    return cache_dir() / "models"


def hub_cache_dir() -> Path:
    """Where sage downloads hub models (huggingface_hub's cache layout:
    models--ORG--REPO/snapshots/REVISION/FILE)."""
    return cache_dir() / "hub"


def temp_beside(final: Path) -> Path:
    """A hidden temp name in the same directory as `final`, so the rename is atomic."""
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yields a temp path to write; renamed to `final` when the block succeeds, removed
    when it raises (an error or Ctrl-C never leaves half a file). The file gets the
    user's umask like any file they write (not mkstemp's 0600)."""
    final = Path(final)
    tmp = temp_beside(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)


@contextmanager
def atomic_files(finals: Sequence[str | Path]) -> Iterator[list[Path]]:
    """atomic_file for several outputs of one command: all are renamed into place after
    the block succeeds, none when it raises (every temp file is removed)."""
    tmps = [temp_beside(Path(f)) for f in finals]
    try:
        yield tmps
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


def write_new(dir: Path, stem: str, suffix: str, text: str) -> Path:
    """Write `text` to dir/STEM.SUFFIX, or dir/STEM-2.SUFFIX, -3, ... when the name is
    taken, and return the path: the file appears whole (a temp file, then a hard link,
    which never replaces an existing file), and two writers at the same moment never get
    the same name (no check-then-write)."""
    dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(dir / f"{stem}{suffix}")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        for n in range(1, 1_000_000):
            path = dir / (f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links: exclusive create instead
                try:
                    with open(path, "x", encoding="utf-8") as f:
                        f.write(text)
                    return path
                except FileExistsError:
                    continue
        raise FileExistsError(f"no free name for {stem}{suffix} in {dir}")
    finally:
        tmp.unlink(missing_ok=True)
