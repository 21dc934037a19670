"""Rollout speed: generated tokens/s of `rlx.rollout.sample` against HF `generate` + a log-prob pass.

    python scripts/bench_rollout.py              # 16 prompts x 8 samples, 64 new tokens, 5 repeats
    python scripts/bench_rollout.py --quick      # 1 repeat, 4 prompts: a smoke test (outputs/bench-quick/)
    python scripts/bench_rollout.py --report     # re-render the RESULTS.md section from the JSON

Both produce what an RL step needs: sampled responses (temperature / top-p) and the per-token
log-probs of the sampling policy.

* rlx  `rlx.rollout.sample`: its own decode loop over a static KV cache; log-probs come out of it.
* hf   `model.generate(do_sample=True, ...)` and then one forward pass over prompt + response
       for the log-probs (`rlx.rollout.sequence_logprobs`), as TRL does it.

The model is the tiny SFT base (built on first use) if cached, else the default random tiny model
(the speed is nearly the same; the lengths are not). The prompts are the first validation
prompts of the reasoning task, each repeated `--samples` times as GRPO groups them. Tokens are
the generated ones up to and including EOS. Runs are interleaved after one untimed warm-up of
each, alternating which goes first; medians are reported. Writes docs/results/bench_rollout.json
and the "Rollout engine" section of docs/RESULTS.md.
"""
from __future__ import annotations

import statistics
import time

import torch

from rlx.benchmark import Bench, interleaved, machine_line

bench = Bench(__doc__, "## Rollout engine (bench_rollout)", quick={"repeats": 1, "prompts": 4})
bench.option("--prompts", type=int, default=16)
bench.option("--samples", type=int, default=8, help="samples per prompt (GRPO's group size)")
bench.option("--max-new-tokens", type=int, default=64)
bench.option("--temperature", type=float, default=1.0)
bench.option("--top-p", type=float, default=1.0)
bench.option("--repeats", type=int, default=5)


def load_model() -> tuple[torch.nn.Module, object, str]:
    from rlx.models import hf, tiny
    from rlx.paths import cache_dir

    path = cache_dir() / "models" / "tiny-sft"
    if (path / "config.json").exists():
        model, tok = hf(str(path), dtype="float32", device="cpu")[:2]
        return model, tok, "tiny-sft"
    model, tok = tiny(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=512, device="cpu")[:2]
    return model, tok, "tiny (random init)"


def run_rlx(model, tok, batch: dict, args, seed: int) -> int:
    from rlx.rollout import sample

    r = sample(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=args.temperature,
               top_p=args.top_p, generator=torch.Generator().manual_seed(seed))
    return int(r.lengths.sum())


@torch.no_grad()
def run_hf(model, tok, batch: dict, args, seed: int) -> int:
    from rlx.rollout import sequence_logprobs

    torch.manual_seed(seed)
    out = model.generate(**batch, do_sample=True, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    P = batch["input_ids"].shape[1]
    response = out[:, P:]
    eos = (response == tok.eos_token_id).long()
    response_mask = (eos.cumsum(-1) - eos == 0).long()
    attention_mask = torch.cat([batch["attention_mask"], response_mask], 1)
    sequence_logprobs(model, out, attention_mask, response.shape[1], temperature=args.temperature)
    return int(response_mask.sum())


ENGINES = {"rlx": run_rlx, "hf": run_hf}


def markdown(r: dict) -> str:
    c, s, m = r["config"], r["summary"], r["machine"]
    rows = [f"| {name} | {s[k]['median_tokens_per_s']:,.0f} | {s[k]['median_wall_s']:.3f} |"
            for k, name in (("rlx", "rlx `rollout.sample` (log-probs included)"),
                            ("hf", "HF `generate(do_sample=True)` + log-prob forward"))]
    return "\n".join([
        bench.heading, "",
        f"Sampling what an RL step needs (responses and their per-token log-probs) from the {r['model']} model: "
        f"{r['rows']} rows ({c['prompts']} prompts x {c['samples']} samples), up to {c['max_new_tokens']} new tokens, "
        f"T={c['temperature']}, top_p={c['top_p']}; median of {c['repeats']} interleaved repeats.", "",
        "| engine | generated tokens/s | time (s) |", "|---|---:|---:|", *rows, "",
        f"- rlx is **{r['speedup']:.2f}x** HF's tokens/s on the same prompts (static KV cache, finished rows leave "
        "the batch, log-probs taken while sampling).",
        f"- Machine: {machine_line(m, libs=('torch', 'transformers'))}.",
        f"- Command: `{r.get('command', 'python scripts/bench_rollout.py')}` ({r['date']}).", ""])


def measure(args) -> dict:
    from rlx.data.collate import prompt_batch
    from rlx.data.reasoning import ReasoningTask

    model, tok, name = load_model()
    model.eval()
    examples = ReasoningTask(max_terms=4).split("validation")
    prompts = [examples[i]["prompt"] for i in range(args.prompts) for _ in range(args.samples)]
    batch = prompt_batch(prompts, tok, "cpu")
    for engine in ENGINES.values():  # warm-up, untimed
        engine(model, tok, batch, args, seed=0)

    runs: dict[str, list[dict]] = {k: [] for k in ENGINES}
    for rep, key in interleaved(ENGINES, args.repeats):
        start = time.perf_counter()
        tokens = ENGINES[key](model, tok, batch, args, seed=rep + 1)
        wall = time.perf_counter() - start
        runs[key].append({"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall})

    summary = {k: {"median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in v),
                   "median_wall_s": statistics.median(r["wall_s"] for r in v),
                   "median_tokens": statistics.median(r["tokens"] for r in v)} for k, v in runs.items()}
    speedup = summary["rlx"]["median_tokens_per_s"] / summary["hf"]["median_tokens_per_s"]
    return bench.record(model=name, rows=len(prompts), config=bench.settings(), summary=summary, speedup=speedup,
                        runs=runs)


if __name__ == "__main__":
    bench.main(measure, markdown)
