"""Computed vs searched: steerlin's schedules beside the searched optimum and the peers' own code.

    python benchmarks/computed_vs_searched.py            # table from the saved results
    python benchmarks/computed_vs_searched.py --run      # run both benchmarks first (hours on CPU)
    python benchmarks/computed_vs_searched.py --task hate

Reads benchmarks/results/computed_vs_searched[_hate].json (benchmarks/steer_eval.py with the
strategies min-norm, exact, searched, prompt: same concept split, calibration stems and held-out
stems; the searched optimum may come from a separate run, computed_vs_searched_grid[_hate].json)
and benchmarks/results/peers[_hate].json (benchmarks/peers.py: steering-vectors and repeng run
natively on the Hugging Face Gemma-3-270m, coefficient chosen on the same calibration stems).
One row per method: judged Δ(+,−) ± sd over seeds, perplexity ratio to the unsteered text (+ /
−), measured KL (nats/token), cost to produce the schedule (full-model forward token positions
and wall seconds, directions/fit/training and calibration/search included) and the goal's ratios
against the searched optimum.

Units of cost: steerlin's counts are token positions through the first block (padding and
KV-cached steps included, counted by a hook); the peers' are prompt + generated tokens of their
training and search forwards (benchmarks/peers.py). Wall seconds were measured on a shared
2-core machine under varying load: compare them within a run only.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks" / "results"
LABEL = {
    "min-norm": "steerlin (surrogate, min-norm)",
    "exact": "steerlin (exact gains, min-norm)",
    "searched": "searched optimum (layer/band x coef)",
    "prompt": "prompting (instruction prefix)",
    "prompt+min-norm": "prompt + steerlin min-norm",
}


def _row(name: str, r: dict, cost: dict | None) -> dict:
    return {
        "method": name,
        "t": r.get("choice", r.get("t")),
        "delta": r["delta"],
        "delta_sd": r["delta_sd"],
        "judge": (r["judge_plus"], r["judge_minus"]),
        "ppl": (r["ppl_plus"], r["ppl_minus"]),
        "kl": r["kl"],
        "tokens": None if cost is None else cost.get("forward_tokens", cost.get("total_tokens")),
        "seconds": None if cost is None else cost.get("seconds", cost.get("total_s")),
    }


def rows_for(task: str) -> list[dict]:
    sfx = "" if task == "sst2" else f"_{task}"
    ours = json.loads((RES / f"computed_vs_searched{sfx}.json").read_text())["tasks"][task]
    summary = list(ours["summary"])
    grid = RES / f"computed_vs_searched_grid{sfx}.json"  # the searched optimum, if run apart
    if grid.is_file():
        got = json.loads(grid.read_text())["tasks"].get(task, {})
        summary += [r for r in got.get("summary", []) if r["strategy"] == "searched"]
    out = []
    for r in summary:
        if "delta" not in r:
            continue
        out.append(_row(LABEL.get(r["strategy"], r["strategy"]), r, r.get("cost")))
    peers_path = RES / f"peers{sfx}.json"
    if peers_path.is_file():
        peers = json.loads(peers_path.read_text())
        for name, p in peers["peers"].items():
            h = p.get("heldout")
            if not isinstance(h, dict) or "delta" not in h:
                continue
            out.append(_row(f"{name} ({p['selected']['coeff']:g})", h, p.get("cost")))
    return out


def _sd(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f" ± {x:.3f}"


def table(rows: list[dict], judge: str) -> str:
    searched = next((r for r in rows if r["method"].startswith("searched")), None)
    head = (
        f"| method | t / choice | {judge} Δ(+,−) ± sd | {judge} + / − | ppl ratio + / − | KL "
        "| cost: forward tokens | cost: s | Δ / searched | KL ≤ searched | tokens / searched |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        rel = kl_ok = tok = ""
        if searched is not None and r is not searched:
            rel = f"{r['delta'] / searched['delta']:.2f}" if searched["delta"] > 0 else ""
            kl_ok = "yes" if r["kl"] <= searched["kl"] else "no"
            if r["tokens"] and searched["tokens"]:
                tok = f"{r['tokens'] / searched['tokens']:.3f}"
        t = r["t"] if isinstance(r["t"], str) else f"{r['t']:g}"
        tokens = "" if r["tokens"] is None else f"{r['tokens']:,}"
        lines.append(
            f"| {r['method']} | {t} | {r['delta']:+.3f}{_sd(r['delta_sd'])} "
            f"| {r['judge'][0]:+.3f} / {r['judge'][1]:+.3f} "
            f"| {r['ppl'][0]:.2f} / {r['ppl'][1]:.2f} "
            f"| {r['kl']:.3f} | {tokens} | {r['seconds'] or 0:.0f} | {rel} | {kl_ok} "
            f"| {tok} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2", choices=["sst2", "hate"])
    ap.add_argument("--run", action="store_true", help="run steer_eval.py and peers.py first")
    args = ap.parse_args()
    sfx = "" if args.task == "sst2" else f"_{args.task}"
    if args.run:
        py = sys.executable
        subprocess.run(
            [
                py,
                str(ROOT / "benchmarks" / "steer_eval.py"),
                "--tasks",
                args.task,
                "--strategies",
                "min-norm,exact,searched,prompt",
                "--strengths",
                "1,2",
                "--out",
                str(RES / f"computed_vs_searched{sfx}.json"),
            ],
            check=True,
        )
        subprocess.run([py, str(ROOT / "benchmarks" / "peers.py"), "--task", args.task], check=True)
    judge = "VADER" if args.task == "sst2" else "profanity"
    print(table(rows_for(args.task), judge))


if __name__ == "__main__":
    main()
