"""Every benchmark's --report re-renders its published section of docs/RESULTS.md, and its plots,
exactly from docs/results/*.json: the tables are what the scripts produce (into a temporary --out,
so docs/ is not touched)."""
import hashlib
import runpy
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("bench_*.py"))
# (script, flags): a script with a --fold variant publishes a second section from its own JSON
CASES = [(s, []) for s in SCRIPTS] + [(s, ["--fold"]) for s in SCRIPTS if '"--fold"' in s.read_text()]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("script,flags", CASES, ids=[" ".join([s.stem, *f]) for s, f in CASES])
def test_report_reproduces_the_published_section(script, flags, tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "docs" / "results", tmp_path / "results")
    (tmp_path / "RESULTS.md").write_text((ROOT / "docs" / "RESULTS.md").read_text())
    monkeypatch.setattr(sys, "argv", [str(script), "--report", *flags, "--out", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "RESULTS.md").read_text() == (ROOT / "docs" / "RESULTS.md").read_text()
    for png in tmp_path.glob("*.png"):  # the plots it draws are the published ones
        assert _md5(png) == _md5(ROOT / "docs" / png.name), png.name
