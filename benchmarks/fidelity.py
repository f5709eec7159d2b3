"""Fidelity table (issue 7): surrogate vs full-model gain scans on Gemma-3-270m.

    python benchmarks/fidelity.py --task sst2 --sizes 100,50,50 --bases krylov,pod
    python benchmarks/fidelity.py --task irony --sizes 400,200,200
    python benchmarks/fidelity.py --task sst2,irony,hate --sizes 400,200,200   # the issue-7 table

Directions on the concept split, surrogates (each basis; both variants reported from one fit)
on the operating split, scan_gains (eps=0.1, cached path) and exact_gains on the eval split;
concept and logit readouts. Prints the table and writes benchmarks/results/fidelity_<task>_<n>.json.
"""

import argparse
import json
from pathlib import Path

import torch

import steerlin
from steerlin.experiments import run_fidelity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2", help="a task or a comma list (sst2,irony,hate)")
    ap.add_argument("--sizes", default="100,50,50", help="concept,operating,eval per class")
    ap.add_argument("--bases", default="krylov,pod")
    ap.add_argument("--readouts", default="concept,logits")
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON (default results/fidelity_<task>_<n>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nc, no, ne = (int(x) for x in args.sizes.split(","))
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    if args.out and len(tasks) > 1:
        raise SystemExit(
            "--out takes one task; several tasks write results/fidelity_<task>_<n>.json"
        )
    model = steerlin.load_model()
    rows = []
    for name in tasks:
        task = steerlin.load_task(name, data_dir=args.data_dir)
        splits = task.split(nc, no, ne, seed=args.seed)
        run = run_fidelity(
            model,
            splits,
            task=name,
            d=args.d,
            bases=args.bases.split(","),
            readouts=args.readouts.split(","),
            eps=args.eps,
            label_words=(task.spec.positive_label_word, task.spec.negative_label_word),
            seed=args.seed,
        )
        print(name, {k: round(v, 1) for k, v in run.timings.items()}, flush=True)
        out = Path(args.out or Path(__file__).parent / "results" / f"fidelity_{name}_{nc}.json")
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(run.to_json(), indent=1))
        rows += run.table()
    print(f"\nFidelity at {args.sizes} per class, d = {args.d}, eps = {args.eps:g}\n")
    print("| task | readout | basis | variant | Spearman | Pearson | Spearman raw | Pearson raw |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['readout']} | {r['basis']} | {r['variant']} | {r['spearman']:.3f}"
            f" | {r['pearson']:.3f} | {r['spearman_raw']:.3f} | {r['pearson_raw']:.3f} |"
        )


if __name__ == "__main__":
    main()
