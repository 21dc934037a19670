"""Smoke test of scripts/bench_loop.py: `--quick` runs all three loops through the harness, they
agree, and the results section is rewritten without touching the rest of RESULTS.md."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_loop.py"


@pytest.mark.slow
def test_quick_bench_writes_results(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Loop overhead (bench_loop)\n\nstale\n\n## Other\n\nkept\n")
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    result = json.loads((tmp_path / "results" / "bench_loop.json").read_text())
    assert result["config"]["steps"] == 10 and result["config"]["repeats"] == 1
    summary = result["summary"]
    assert set(summary["median_tokens_per_s"]) == {"bare", "rlx", "trainer"}
    assert summary["loss_agreement"]["rlx_vs_bare_loss_max_abs"] < 1e-5
    text = results.read_text()
    assert "stale" not in text and "| rlx |" in text and text.endswith("## Other\n\nkept\n")
