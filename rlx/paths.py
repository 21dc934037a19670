"""Where rlx keeps things on disk: the repo's conf/ and shipped assets, and the user cache."""
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
CONF_DIR = REPO_ROOT / "conf"
ASSETS_DIR = PACKAGE_DIR / "assets"


def cache_dir() -> Path:
    """$RLX_CACHE, else ~/.cache/rlx: converted checkpoints, fetched corpora, cached base models."""
    return Path(os.environ.get("RLX_CACHE", Path.home() / ".cache" / "rlx")).expanduser()
