"""Peak memory of `Surrogate.fit` on long prompts (the streaming goal: O(batch), not O(prompts)).

Each measurement runs in a fresh interpreter (bench_engine.py's `--child` stages) and reads
that process's own peak RSS (VmHWM, not ru_maxrss: see bench_engine.peak_mib):

* the model alone (load + one forward): the floor every steerlin call pays;
* `Surrogate.fit` (default basis and d) on N prompts of exactly T tokens (consecutive SST-2
  sentences joined and cut at T), with a sampled RSS trace during the fit.

Goal (issue 14): peak RSS fitting 400 prompts of ~256 tokens <= 4 GiB.

    python benchmarks/bench_memory.py                 # 400 x 256 tokens (~15-40 min)
    python benchmarks/bench_memory.py --quick         # 16 x 256 tokens
    python benchmarks/bench_memory.py --n 100 --long-tokens 512
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import bench_engine as E  # noqa: E402

GOAL_GIB = 4.0


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0], n=400)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--long-tokens", type=int, default=256, help="tokens per prompt (256)")
    p.add_argument("--concept-n", type=int, default=50, help="concept prompts per class (50)")
    args = p.parse_args()
    n = args.n or (16 if args.quick else 400)
    threads = C.thread_counts(args.threads)[0]
    env = C.environment(args) | {"threads": threads, "device": args.device}
    res = {"goal_gib_at_most": GOAL_GIB}
    for key, stage, count in (("model", "model", 0), ("fit", "fit", n)):
        C.say(f"{key}: fresh interpreter, stage {stage!r}")
        try:
            res[key] = E.run_child(args, stage, threads, count)
        except SystemExit as exc:  # report what failed, keep the rest
            res[key] = {"error": str(exc)}
    m, f = res["model"], res["fit"]
    if "error" not in m:
        print(f"model alone: peak {m['after_model_mib']:.0f} MiB ({m['param_mib']:.0f} MiB params)")
    if "error" not in f:
        gib = f["after_fit_mib"] / 1024
        res["verdict"] = C.verdict(gib, GOAL_GIB, at_least=False)
        print(
            f"fit d=8 on {f['n']} x {f['tokens']} tokens: peak {f['after_fit_mib']:.0f} MiB "
            f"({gib:.2f} GiB; goal <= {GOAL_GIB} GiB: {res['verdict']}), "
            f"{f['fit_s']:.1f} s wall / {f['fit_cpu_s']:.1f} s CPU"
        )
    else:
        print(f"fit failed: {f['error']}")
    C.write_results("bench_memory", args, env, res)


if __name__ == "__main__":
    main()
