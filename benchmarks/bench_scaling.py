"""How Surrogate.fit's time scales with the number of prompts and with the order d, Gemma-3-270m.

Times the fit at n = 50, 100, 200, 400 SST-2 operating prompts (d = 32; nested subsets of one
split, so the length distribution is the same) and at d = 8, 16, 32, 64 (n = 100), and prints
the least-squares slope of log(time) against log(n) and log(d): ~1 means linear.

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --quick          # n = 8, 16, 32; d = 4, 8, 16 at n = 16
    python benchmarks/bench_scaling.py --ns 50,100 --ds 8,16 --threads 1,2
"""

from __future__ import annotations

import math

import _common as C
import numpy as np


def ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def slope(xs, ys) -> float:
    """Least-squares exponent b of y = a x^b."""
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--ns", default=None, help="prompt counts (default 50,100,200,400)")
    p.add_argument("--ds", default=None, help="orders (default 8,16,32,64)")
    p.add_argument("--d", type=int, default=None, help="d for the n sweep (32; quick 8)")
    p.add_argument("--n-for-d", type=int, default=None, help="n for the d sweep (100; quick 16)")
    p.add_argument("--concept-n", type=int, default=None, help="concept prompts per class (100)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    counts = C.thread_counts(args.threads)
    C.set_threads(counts[0])
    ns = ints(args.ns) if args.ns else ([8, 16, 32] if args.quick else [50, 100, 200, 400])
    ds = ints(args.ds) if args.ds else ([4, 8, 16] if args.quick else [8, 16, 32, 64])
    d_n = args.d or (8 if args.quick else 32)
    n_d = args.n_for_d or (16 if args.quick else 100)
    n_concept = args.concept_n or (8 if args.quick else 100)
    env = C.environment(args)

    from steerlin import ConceptDirections, Surrogate

    model = C.load_gemma()
    n_max = max(max(ns), n_d)
    splits = C.sst2_splits(args.data_dir, n_concept, math.ceil(n_max / 2), 0, seed=args.seed)
    ops = C.texts(splits.operating)
    dirs = ConceptDirections.fit(model, C.texts(splits.concept), list(splits.concept.labels))
    bs = args.batch_size

    rows, fits = [], []
    for threads in counts:
        C.set_threads(threads)
        Surrogate.fit(model, ops[:4], dirs, d=4, batch_size=bs)  # warm-up
        by_n, by_d = [], []
        for n in ns:
            _, wall, cpu = C.timed(
                lambda n=n: Surrogate.fit(model, ops[:n], dirs, d=d_n, batch_size=bs)
            )
            C.say(f"threads={threads} n={n} d={d_n}: {wall:.1f} s")
            rows.append(
                {
                    "threads": threads,
                    "sweep": "n",
                    "n": n,
                    "d": d_n,
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "ms_per_prompt": 1e3 * wall / n,
                }
            )
            by_n.append((n, wall, cpu))
        for d in ds:
            _, wall, cpu = C.timed(
                lambda d=d: Surrogate.fit(model, ops[:n_d], dirs, d=d, batch_size=bs)
            )
            C.say(f"threads={threads} n={n_d} d={d}: {wall:.1f} s")
            rows.append(
                {
                    "threads": threads,
                    "sweep": "d",
                    "n": n_d,
                    "d": d,
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "ms_per_prompt": 1e3 * wall / n_d,
                }
            )
            by_d.append((d, wall, cpu))
        fits.append(
            {
                "threads": threads,
                "exponent_n": slope([x[0] for x in by_n], [x[1] for x in by_n]),
                "exponent_n_cpu": slope([x[0] for x in by_n], [x[2] for x in by_n]),
                "exponent_d": slope([x[0] for x in by_d], [x[1] for x in by_d]),
                "exponent_d_cpu": slope([x[0] for x in by_d], [x[2] for x in by_d]),
            }
        )
    print(C.table(rows))
    print("\nlog-log exponents (time ~ n^a, time ~ d^b)")
    print(C.table(fits))
    C.write_results(
        "bench_scaling",
        args,
        env,
        {
            "config": {
                "ns": ns,
                "ds": ds,
                "d_for_n_sweep": d_n,
                "n_for_d_sweep": n_d,
                "batch_size": bs,
                "n_concept_per_class": n_concept,
            },
            "rows": rows,
            "exponents": fits,
        },
    )


if __name__ == "__main__":
    main()
