"""Gemma-3-270m in bfloat16 vs float32: what steerlin returns, its peak memory and its time.

A bf16 model's frozen maps, JVPs and VJPs are computed in float32 one block's float32 copy at
a time (`steerlin.frozen.BlockUpcast`), with no float32 copy of the model. Each dtype runs in
a fresh interpreter (its own peak RSS, reset after loading so it counts steerlin's work, not
the loader's conversion), float32 first:

* concept directions from the float32 model (concept split), shared by both runs so that the
  comparison isolates the maps' precision (the bf16 run's own directions are compared too);
* exact gains on the operating prompts (`exact_gains`);
* the surrogate (`Surrogate.fit`, d = 8, default basis) on the same prompts;
* calibration (`steerlin.calibrate`) of one schedule, the least-norm schedule of the float32
  exact gains (`Controller.from_gains`), for a +1 class-separation shift on the eval prompts;
* a steered greedy generation (`Controller.apply` under `model.generate`).

Agreement of bf16 with float32 (`steerlin.metrics.fidelity`: raw Spearman and per-layer
relative errors), multiplier agreement, peak RSS of the steerlin calls (VmHWM after a reset),
the peak bytes of float32 block copies alive at once, and wall / CPU seconds.

    python benchmarks/bench_bf16.py                # 32 operating prompts (~4-8 min, 1 thread)
    python benchmarks/bench_bf16.py --n 64 --threads 2
    python benchmarks/bench_bf16.py --quick        # 8 operating prompts

Writes benchmarks/results/bench_bf16.json (bench_bf16_quick.json with --quick).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DTYPES = ("float32", "bfloat16")


def child(args) -> None:
    import gc

    C.set_threads(int(args.threads))
    import torch

    import steerlin
    from steerlin import ConceptDirections, Controller, Surrogate, calibrate, exact_gains
    from steerlin.frozen import upcast_stats

    dtype = getattr(torch, args.dtype)
    out: dict = {"dtype": args.dtype}
    model, out["load_s"], _ = C.timed(lambda: steerlin.load_model("gemma-3-270m", dtype=dtype))
    out["param_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    out["block_fp32_mib"] = (
        max(sum(p.numel() * 4 for p in b.parameters()) for b in model.blocks) / 2**20
    )
    gc.collect()
    out["after_load_mib"] = C.proc_status_mib().get("VmRSS")
    out["peak_reset"] = C.reset_peak_rss()
    sp = C.sst2_splits(args.data_dir, args.concept_n, args.n // 2, args.eval_n, seed=args.seed)
    ops, ev = C.texts(sp.operating), C.texts(sp.eval)
    shared = Path(args.shared)
    if args.dtype == "float32":
        dirs, out["directions_s"], _ = C.timed(
            lambda: ConceptDirections.fit(model, C.texts(sp.concept), sp.concept.labels)
        )
    else:
        ref = torch.load(shared / "float32.pt")
        dirs = ConceptDirections(ref["vectors"], ref["unit"], ref["scale"], dict(ref["meta"]))
        own = ConceptDirections.fit(model, C.texts(sp.concept), sp.concept.labels)
        cos = (own.unit.double() * dirs.unit.double()).sum(-1)
        out["own_directions_cos_min"] = float(cos.min())
    upcast_stats(reset=True)
    t = {}
    g, t["exact_s"], t["exact_cpu_s"] = C.timed(lambda: exact_gains(model, ops, dirs))
    sur, t["fit_s"], t["fit_cpu_s"] = C.timed(lambda: Surrogate.fit(model, ops, directions=dirs))
    g_ref = g if args.dtype == "float32" else torch.load(shared / "float32.pt")["exact"]
    ctrl = Controller.from_gains(g_ref, dirs, 1.0)
    target = float(ctrl.target[0])
    cal, t["calibrate_s"], t["calibrate_cpu_s"] = C.timed(
        lambda: calibrate(model, ev, ctrl.schedule, target, units="raw")
    )
    out.update(t)
    out["peak_steerlin_mib"] = C.peak_rss_mib()
    out["upcast_peak_mib"] = upcast_stats()["peak"] / 2**20
    out["exact"] = g.tolist()
    out["surrogate"] = sur.gains.tolist()
    out["multiplier"] = cal.multiplier
    out["measured_shift"] = cal.measured_shift
    out["target"] = target
    out["scale"] = dirs.scale.double().tolist()
    # the generation path: Controller.calibrate in its regime (full forwards with hooks, in
    # the model's own dtype), then Controller.apply under model.generate
    _, out["controller_calibrate_s"], _ = C.timed(lambda: ctrl.calibrate(model, ev[:4], n_tokens=4))
    out["controller_multiplier"] = ctrl.calibration.multiplier
    prompts = ["The movie was", "I think this film"]
    with ctrl.apply(model):
        out["steered"], out["generate_s"], _ = C.timed(
            lambda: model.generate(
                prompts, max_new_tokens=8, do_sample=False, verbose=False, padding_side="left"
            )
        )
    out["weights_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    out["model_dtype"] = str(model.cfg.dtype)
    if args.dtype == "float32":
        torch.save(
            {
                "vectors": dirs.vectors,
                "unit": dirs.unit,
                "scale": dirs.scale,
                "meta": dirs.meta,
                "exact": g,
            },
            shared / "float32.pt",
        )
    C.child_result(out)


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0], n=32)
    p.add_argument("--concept-n", type=int, default=16, help="concept prompts per class (16)")
    p.add_argument("--eval-n", type=int, default=8, help="calibration prompts per class (8)")
    p.add_argument("--child", action="store_true", help=C.HIDDEN)
    p.add_argument("--dtype", default="float32", help=C.HIDDEN)
    p.add_argument("--shared", default="", help=C.HIDDEN)
    args = p.parse_args()
    if args.n is None:
        args.n = 8 if args.quick else 32
    if args.child:
        return child(args)
    threads = C.thread_counts(args.threads)[0]
    # the children's BLAS/OpenMP pools too (scipy's eigh in the two-sided basis): on a loaded
    # machine an idle-spinning pool made single eigh calls 10-100x slower in either dtype
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    env = C.environment(args) | {"threads": threads}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dt in DTYPES:
            flags = [
                "--dtype", dt, "--shared", tmp, "--threads", threads, "--n", args.n,
                "--concept-n", args.concept_n, "--eval-n", args.eval_n,
                "--data-dir", args.data_dir, "--seed", args.seed,
            ]  # fmt: skip
            runs[dt], _ = C.run_child(__file__, flags, f"{dt}: load, exact, fit, calibrate")
    res = compare(runs["float32"], runs["bfloat16"])
    res["sizes"] = {
        "operating": args.n,
        "concept_per_class": args.concept_n,
        "calibration": 2 * args.eval_n,
    }
    res["runs"] = runs
    C.write_results("bench_bf16", args, env, res)


def compare(f32: dict, bf: dict) -> dict:
    import torch

    from steerlin.metrics import fidelity

    scale = torch.tensor(f32["scale"])
    out: dict = {}
    for key in ("exact", "surrogate"):
        fid = fidelity(torch.tensor(bf[key]), torch.tensor(f32[key]), scale)
        out[key] = {
            "raw_spearman": fid.raw_spearman,
            "rel_err_median": fid.rel_err_median,
            "rel_err_max": fid.rel_err_max,
        }
    # the surrogate's own reduction error in each dtype (vs that dtype's exact gains)
    for dt, run in (("float32", f32), ("bfloat16", bf)):
        fid = fidelity(torch.tensor(run["surrogate"]), torch.tensor(run["exact"]), scale)
        out[f"reduction_{dt}"] = {
            "raw_spearman": fid.raw_spearman,
            "rel_err_median": fid.rel_err_median,
        }
    for key in ("multiplier", "controller_multiplier"):
        out[key] = {
            "float32": f32[key],
            "bfloat16": bf[key],
            "rel_diff": abs(bf[key] - f32[key]) / abs(f32[key]),
        }
    rows = []
    for what, unit in (
        ("param_mib", "MiB"),
        ("after_load_mib", "MiB"),
        ("peak_steerlin_mib", "MiB"),
        ("upcast_peak_mib", "MiB"),
        ("exact_s", "s"),
        ("fit_s", "s"),
        ("calibrate_s", "s"),
        ("controller_calibrate_s", "s"),
        ("exact_cpu_s", "s"),
        ("fit_cpu_s", "s"),
        ("calibrate_cpu_s", "s"),
    ):
        a, b = f32[what], bf[what]
        rows.append(
            {
                "measure": f"{what} ({unit})",
                "float32": round(a, 1),
                "bfloat16": round(b, 1),
                "bf16/fp32": round(b / a, 2) if a else None,
            }
        )
    out["table"] = rows
    print(C.table(rows))
    agree = [
        {
            "what": key,
            "raw Spearman": round(out[key]["raw_spearman"], 5),
            "median rel err": f"{out[key]['rel_err_median']:.2e}",
            "max rel err": f"{out[key]['rel_err_max']:.2e}",
        }
        for key in ("exact", "surrogate")
    ]
    print()
    print(C.table(agree))
    m, mc = out["multiplier"], out["controller_multiplier"]
    print(
        f"\ncalibration multiplier: float32 {m['float32']:.5f}, bf16 {m['bfloat16']:.5f} "
        f"(relative difference {m['rel_diff']:.2e}); Controller.calibrate (generation "
        f"regime, hooks in the model's dtype): {mc['float32']:.4f} vs {mc['bfloat16']:.4f} "
        f"({mc['rel_diff']:.2e}); surrogate reduction error median "
        f"{out['reduction_float32']['rel_err_median']:.2%} (fp32) / "
        f"{out['reduction_bfloat16']['rel_err_median']:.2%} (bf16); bf16 own directions vs "
        f"fp32: min cos {bf['own_directions_cos_min']:.5f}; bf16 weights after: "
        f"{bf['weights_dtypes']}"
    )
    return out


if __name__ == "__main__":
    main()
