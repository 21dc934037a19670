"""rlx.benchmark, the harness of scripts/bench_*.py: flags, the one writer of results, --report, metric."""
import json
import math

import pytest

from rlx.benchmark import Bench, metric, upsert, write_section

HEADING = "## Toy (bench_toy)"


def toy(out):
    bench = Bench("A toy benchmark.", HEADING, name="bench_toy", runs={"a": ["x=1"], "b": ["x=2"]},
                  quick={"steps": 1, "runs": ["a"]})
    bench.option("--steps", type=int, default=10)
    calls = []

    def measure(args):
        runs = bench.earlier(steps=args.steps).get("runs", [])
        for name in args.runs:
            calls.append(name)
            runs = upsert(runs, {"name": name, "steps": args.steps, "eval/loss": 0.5}, "name")
            result = bench.record(steps=args.steps, runs=runs)
        return result

    def render(result):
        rows = [f"| {r['name']} | {metric(r, 'eval/perplexity'):.3f} |" for r in result["runs"]]
        return "\n".join([HEADING, "", f"{result['steps']} steps.", "", "| run | ppl |", "|---|---:|", *rows, ""])

    return bench, lambda *argv: bench.main(measure, render, argv=[*argv, "--out", str(out)]), calls


def test_measure_record_publish_and_report(tmp_path):
    (tmp_path / "RESULTS.md").write_text(f"# Results\n\n{HEADING}\n\nstale\n\n## Other\n\nkept\n")
    bench, main, calls = toy(tmp_path)
    main("--runs", "b")
    main("--runs", "a")  # the same budget: b is kept, a joins it
    result = json.loads((tmp_path / "results" / "bench_toy.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["b", "a"] and calls == ["b", "a"]
    assert {"command", "date", "machine"} <= set(result) and result["command"].startswith("python ")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "stale" not in text and f"| a | {math.exp(0.5):.3f} |" in text and text.endswith("## Other\n\nkept\n")
    main("--report")  # measures nothing and renders the same section
    assert calls == ["b", "a"] and (tmp_path / "RESULTS.md").read_text() == text
    main("--runs", "a", "--steps", "3")  # another budget: the earlier runs are dropped
    assert [r["name"] for r in json.loads(bench.json_path.read_text())["runs"]] == ["a"]


def test_quick_takes_its_settings(tmp_path):
    bench, main, calls = toy(tmp_path)
    main("--quick")
    assert calls == ["a"] and bench.args.steps == 1 and bench.settings() == {"runs": ["a"], "steps": 1}
    assert "1 steps." in (tmp_path / "RESULTS.md").read_text()


def test_quick_never_writes_the_published_results():
    bench, *_ = toy(None)
    bench.parse(["--quick"])
    assert "outputs" in bench.json_path.parts and "docs" not in bench.json_path.parts
    bench.parse([])
    assert bench.results_path.parts[-2:] == ("docs", "RESULTS.md")


def test_report_needs_results(tmp_path):
    _, main, _ = toy(tmp_path)
    with pytest.raises(SystemExit):
        main("--report")


def test_note_comes_after_the_heading(tmp_path):
    bench, _, _ = toy(tmp_path)
    bench.parse(["--out", str(tmp_path)])
    bench.publish({"note": "**Stale:** rerun me.", "steps": 1, "runs": []},
                  lambda r: f"{HEADING}\n\nbody\n")
    assert f"{HEADING}\n\n**Stale:** rerun me.\n\nbody\n" in (tmp_path / "RESULTS.md").read_text()


def test_write_section_appends_a_new_heading(tmp_path):
    path = tmp_path / "R.md"
    write_section(path, "## New", "## New\n\nrow\n")
    assert path.read_text() == "# Results\n\n## New\n\nrow\n"


def test_metric_reads_summaries_and_run_folders(tmp_path):
    assert metric({"eval/loss": 0.0}, "eval/perplexity") == 1.0
    assert math.isnan(metric({}, "eval/accuracy")) and metric({}, "params_M", 0) == 0
    rows = [{"step": 1, "train/loss": 2.0}, {"step": 1, "eval/loss": 1.5}, {"step": 2, "train/loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert metric(tmp_path, "train/loss") == [2.0, 1.0]
    assert metric(rows, "train/loss", steps=True) == [(1, 2.0), (2, 1.0)]


def test_sweep_records_after_every_run(tmp_path, capsys):
    bench, _, _ = toy(tmp_path)
    bench.parse(["--out", str(tmp_path)])
    seen = []

    def run(name, seed):
        if seen:  # the first run is on disk before the second starts
            assert [r["name"] for r in bench.load()["runs"]] == ["a", "b", "c"]
        seen.append(name)
        return {"name": name, "seed": seed, "eval/loss": 0.25}

    earlier = [{"name": "a", "seed": 0, "eval/loss": 9.0}, {"name": "c", "seed": 0}]
    result = bench.sweep(run, [("b", 0), ("a", 0)], ("name", "seed"), earlier,
                         lambda runs: {"n": len(runs)}, order=["a", "b"], show=("eval/perplexity",))
    assert [r["name"] for r in result["runs"]] == ["a", "b", "c"] and result["n"] == 3
    assert result["runs"][0]["eval/loss"] == 0.25  # the rerun replaced the earlier a
    assert f"b 0: eval/perplexity {math.exp(0.25):.4g}" in capsys.readouterr().out


def test_concurrent_sweeps_into_one_json_keep_each_others_runs(tmp_path):
    """Two processes sweeping different seeds into one JSON: the second writer does not drop the runs
    the first recorded meanwhile, and runs an earlier budget dropped stay dropped."""
    first, _, _ = toy(tmp_path)
    first.parse(["--out", str(tmp_path)])
    first.record(runs=[{"name": "old", "seed": 0}])  # recorded under another budget, dropped below
    other, _, _ = toy(tmp_path)
    other.parse(["--out", str(tmp_path)])

    def run(name, seed):
        if seed == 0:  # while this run trains, another process records seeds 1 and 2
            other.sweep(lambda n, s: {"name": n, "seed": s}, [("a", 1), ("b", 2)], ("name", "seed"), [])
        return {"name": name, "seed": seed}

    result = first.sweep(run, [("a", 0), ("b", 0)], ("name", "seed"), [], lambda runs: {"n": len(runs)})
    assert sorted((r["name"], r["seed"]) for r in result["runs"]) == [("a", 0), ("a", 1), ("b", 0), ("b", 2)]
    assert first.load() == result and result["n"] == 4


def test_time_calls_wraps_and_restores():
    import types

    from rlx.benchmark import OtherCpu, time_calls

    box = types.SimpleNamespace(f=lambda x: x + 1)
    original = box.f
    with time_calls(box, "f", []) as spent, OtherCpu() as other:
        assert box.f(1) == 2 and box.f(2) == 3
    assert len(spent) == 2 and all(s >= 0 for s in spent) and box.f is original
    assert other.cores >= 0


def test_interleaved_rotates_the_order():
    from rlx.benchmark import interleaved

    assert list(interleaved("ab", 3)) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    assert [n for _, n in interleaved(["x", "y", "z"], 2)] == ["x", "y", "z", "y", "z", "x"]


def test_quiet_run_returns_the_run_with_other_cores():
    from rlx.benchmark import quiet_run

    rejected = []
    result = quiet_run(lambda: {"s": 1}, quiet=100.0, retries=1, max_wait=0, rejected=rejected)
    assert result["s"] == 1 and result["other_cores"] >= 0 and rejected == []


def test_the_heading_names_the_results_file():
    assert Bench("", "## Domain pruning (bench_dpruner)").name == "bench_dpruner"
    assert Bench("", "## Embedded default", name="embedded").name == "embedded"


def test_runs_alias_keeps_the_older_flag():
    bench = Bench("", "## Toy (bench_toy)", runs={"a": [], "b": []}, runs_alias="--methods")
    assert bench.parse(["--methods", "b"]).runs == ["b"] and bench.parse([]).runs == ["a", "b"]
