"""Peak resident memory (ru_maxrss) of fitting a surrogate on 400 SST-2 prompts, Gemma-3-270m.

Each measurement runs in a FRESH subprocess, so the peak is that workload's alone:
  * model:  import steerlin, load the model, one short forward (the baseline);
  * fit:    the same, then concept directions on --concept-n prompts per class, then
            Surrogate.fit (d=32) on N operating prompts; the peak is read after each stage.

Goal: peak RSS of the fit <= 4 GiB.

    python benchmarks/bench_memory.py               # N=400
    python benchmarks/bench_memory.py --quick       # N=32
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import _common as C

GOAL_GIB = 4.0


def child(args) -> None:
    """Runs in the subprocess: prints one JSON line of peak-RSS readings (MiB) per stage."""
    C.set_threads(C.thread_counts(args.threads)[0])
    out = {}
    import torch

    import steerlin

    out["after_import_mib"] = C.max_rss_mib()
    with C.RssSampler() as sampler:
        model = steerlin.load_model()
        with torch.no_grad():
            model("The movie was great", return_type=None)
        out["after_model_mib"] = C.max_rss_mib()
        out["model_sampled"] = sampler.reading()
        out["current_after_model"] = C.proc_status_mib()
        out["param_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        if args.stage == "fit":
            splits = C.sst2_splits(
                args.data_dir, args.concept_n, math.ceil(args.n / 2), 0, seed=args.seed
            )
            dirs = steerlin.ConceptDirections.fit(
                model, C.texts(splits.concept), list(splits.concept.labels)
            )
            out["after_directions_mib"] = C.max_rss_mib()
            ops = C.texts(splits.operating)[: args.n]
            fit = lambda: steerlin.Surrogate.fit(
                model, ops, dirs, d=args.d, batch_size=args.batch_size
            )
            _, wall, cpu = C.timed(fit)
            out["after_fit_mib"] = C.max_rss_mib()
            out["fit_sampled"] = sampler.reading()
            out["fit_s"] = wall
            out["n"] = len(ops)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(args, stage: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--stage",
        stage,
        "--threads",
        str(args.threads),
        "--n",
        str(args.n),
        "--concept-n",
        str(args.concept_n),
        "--d",
        str(args.d),
        "--batch-size",
        str(args.batch_size),
        "--data-dir",
        str(args.data_dir),
        "--seed",
        str(args.seed),
    ]
    C.say(f"fresh subprocess: {stage}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {stage} failed with exit code {proc.returncode}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0], n=400)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--concept-n", type=int, default=None, help="concept prompts per class (100)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--stage", choices=("model", "fit"), default="fit", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args)
        return
    args.n = C.pick(args, 400, 32)
    args.concept_n = args.concept_n or (8 if args.quick else 100)
    env = C.environment(args)
    base = run_child(args, "model")
    fit = run_child(args, "fit")
    gib = fit["after_fit_mib"] / 1024
    ms, fs = base["model_sampled"], fit["fit_sampled"]
    rows = [
        {"run": "model only", "stage": "import", "ru_maxrss_mib": base["after_import_mib"]},
        {
            "run": "model only",
            "stage": "load + forward",
            "ru_maxrss_mib": base["after_model_mib"],
            "anon_at_peak_mib": ms["anon_at_peak_mib"],
            "file_at_peak_mib": ms["file_at_peak_mib"],
            "peak_anon_mib": ms["peak_anon_mib"],
            "rss_after_mib": base["current_after_model"].get("VmRSS"),
        },
        {"run": "fit", "stage": "load + forward", "ru_maxrss_mib": fit["after_model_mib"]},
        {"run": "fit", "stage": "+ directions", "ru_maxrss_mib": fit["after_directions_mib"]},
        {
            "run": "fit",
            "stage": f"+ fit n={fit['n']}",
            "ru_maxrss_mib": fit["after_fit_mib"],
            "anon_at_peak_mib": fs["anon_at_peak_mib"],
            "file_at_peak_mib": fs["file_at_peak_mib"],
            "peak_anon_mib": fs["peak_anon_mib"],
        },
    ]
    print(C.table(rows))
    print(
        f"\nparameters {base['param_mib']:.0f} MiB. ru_maxrss counts file-backed pages too: at the "
        f"load peak {ms['file_at_peak_mib']:.0f} MiB were file pages (libraries). "
        f"Peak anonymous memory: model only {ms['peak_anon_mib']:.0f} MiB, whole fit run "
        f"{fs['peak_anon_mib']:.0f} MiB."
    )
    print(
        f"fit of {fit['n']} prompts (d={args.d}) took {fit['fit_s']:.1f} s; peak RSS "
        f"(ru_maxrss) {gib:.2f} GiB, model-only baseline {base['after_model_mib'] / 1024:.2f} "
        f"GiB: {C.verdict(gib, GOAL_GIB, at_least=False)} <= {GOAL_GIB} GiB"
    )
    C.write_results(
        "bench_memory",
        args,
        env,
        {
            "config": {
                "n": args.n,
                "d": args.d,
                "concept_n_per_class": args.concept_n,
                "batch_size": args.batch_size,
            },
            "goals": {"peak_rss_gib_at_most": GOAL_GIB},
            "model_only": base,
            "fit": fit,
            "peak_rss_gib": gib,
        },
    )


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
