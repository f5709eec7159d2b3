"""The same small steerlin workload at 1 and 2 torch threads (each in a fresh subprocess).

Workload on SST-2 prompts, Gemma-3-270m: capture (full forwards), scan_gains (cached),
exact_gains (one backward), Surrogate.fit (JVPs, d=16). Threads are set in the child from
--threads before any work; the thread counts alternate over --repeats (1,2,1,2,...) so a
drifting machine load hits both alike. speedup = time at the first count / time at each.

    python benchmarks/bench_threads.py                  # 1 and 2 threads, 32 prompts
    python benchmarks/bench_threads.py --quick          # 8 prompts
    python benchmarks/bench_threads.py --threads 1,2,4 --repeats 2
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import _common as C

STEPS = ("capture", "scan_cached", "exact_gains", "fit_d16")


def child(args) -> None:
    C.set_threads(int(args.threads))
    import torch

    from steerlin import ConceptDirections, Surrogate, capture, exact_gains, scan_gains

    model = C.load_gemma()
    splits = C.sst2_splits(args.data_dir, 8, math.ceil(args.n / 2), 0, seed=args.seed)
    ops = C.texts(splits.operating)[: args.n]
    dirs = ConceptDirections.fit(model, C.texts(splits.concept), list(splits.concept.labels))
    capture(model, ops[:4])  # warm-up
    work = {
        "capture": lambda: capture(model, ops),
        "scan_cached": lambda: scan_gains(model, ops, dirs),
        "exact_gains": lambda: exact_gains(model, ops, dirs),
        "fit_d16": lambda: Surrogate.fit(model, ops, dirs, d=16),
    }
    out = {"threads": torch.get_num_threads(), "n": len(ops)}
    for name in STEPS:
        _, wall, cpu = C.timed(work[name])
        out[name] = wall
        out[name + "_cpu"] = cpu
    print("RESULT " + json.dumps(out), flush=True)


def run_child(args, threads: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--threads",
        str(threads),
        "--n",
        str(args.n),
        "--data-dir",
        str(args.data_dir),
        "--seed",
        str(args.seed),
    ]
    C.say(f"fresh subprocess: {threads} thread(s)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child (threads={threads}) failed with exit code {proc.returncode}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0], n=32, threads="1,2")
    p.add_argument("--repeats", type=int, default=1, help="runs per thread count (alternating)")
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args)
        return
    counts = C.thread_counts(args.threads)
    args.n = C.pick(args, 32, 8)
    env = C.environment(args)
    runs = [run_child(args, t) for _ in range(args.repeats) for t in counts]
    rows = []
    for t in counts:
        mine = [r for r in runs if r["threads"] == t]
        row = {"threads": t, "n": args.n}
        for s in STEPS:
            row[s] = statistics.median(r[s] for r in mine)
            row[s + "_cpu"] = statistics.median(r[s + "_cpu"] for r in mine)
        rows.append(row)
    for row in rows:
        for s in STEPS:
            row[s + "_speedup"] = rows[0][s] / row[s]
    print(C.table(rows, ["threads", "n", *STEPS]))
    print("\nspeedup vs the first thread count (wall time)")
    print(C.table(rows, ["threads", *[s + "_speedup" for s in STEPS]]))
    C.write_results(
        "bench_threads",
        args,
        env,
        {
            "config": {"n": args.n, "repeats": args.repeats, "threads": counts},
            "runs": runs,
            "rows": rows,
        },
    )


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
