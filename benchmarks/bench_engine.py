"""The frozen-context engine at its work bound: scan, fit and exact gains on Gemma-3-270m.

One run prints, on short (SST-2 sentences, ~11 tokens) and long (256-token) prompts:

* measured time / work-bound time for the cached scan (`scan_gains`), `Surrogate.fit` (d=8,
  default basis and "krylov"/"two-sided", and d=32) and `exact_gains`. The work bound is
  block-token evaluations x the measured cost of one block-token in a batched full forward
  of the same prompts (same batches, same padding): a forward of the padded batch counts
  T*L, one single-token block pass 1, a JVP tangent 1 (+1 for the primal per prompt and
  layer), a VJP or backward 2. So per prompt (padded length T, L blocks):
      scan     L*T + L(L+1)          (all 2(l+1) perturbed states pushed through block l)
      exact    L*T + 3L              (the last-token chain forward, its backward)
      fit      L*T + L(d+1)          (one streamed forward; d tangents + 1 primal per block)
      two-sided fit: + L*T + 3L (the observability pass streams one batch's full context at
                     a time, then the layer-wise sweep: a second forward; VJP primal + backward)
  A ratio above 1 means the single-token path costs less per block-token than TransformerLens's
  batched full forward does (no hook points, no GQA head expansion, no mask/rotary rebuild).
* the hook scan (2L full forwards) vs the cached scan on the same prompts, against the bound
  2L*L*sum(T) / (L*sum(T) + L(L+1)*n) = 2L*T/(T+L+1) for equal lengths;
* engine="fast" vs engine="tl" (TransformerLens's own block) on the same prompts: time and
  the difference of the gains;
* fit d=8 and d=32 time / exact_gains time;
* cost vs number of prompts (log-log exponent), vs d, vs prompt length;
* JVP micro-benchmark at one block: fast.block_jvp vs torch.func.jvp / linearize (vmapped);
* peak RSS (VmHWM, fresh subprocess) of fitting 400 prompts of 256 tokens (d=8, default
  basis), and of the model alone;
* thread scaling at 1 and 2 threads (fresh subprocess each: scan, exact, fit d=8).

    python benchmarks/bench_engine.py                 # ~20-25 min on one loaded core
    python benchmarks/bench_engine.py --quick         # smoke run (a few minutes)
    python benchmarks/bench_engine.py --device cuda   # same measurements on a GPU
    python benchmarks/bench_engine.py --skip rss,threads
    python benchmarks/bench_engine.py --profile fit-long   # + torch.profiler table of one step

Writes benchmarks/results/engine.json (engine_quick.json with --quick). The measurements are
in _engine_sections.py, the tables in _engine_report.py.
"""

from __future__ import annotations

import time
import warnings

import _common as C
import torch
from _engine_report import report
from _engine_sections import jvp_micro, long_prompts, measure_set, scaling, timed

GOALS = {
    "bound_fraction_at_least": 0.8,  # scan and fit, short and long prompts
    "hook_ratio_fraction_of_bound_at_least": 0.8,
    "fit_d8_over_exact_at_most": 2.0,
    "rss_gib_at_most": 4.0,
}
STEPS = ("scan", "exact", "fit", "hooks", "tl", "scaling", "jvp", "threads", "rss")

# ------------------------------------------------------------------------------ children


def child(args) -> None:
    """In a fresh interpreter: --stage model | fit (RSS) | threads (timings)."""
    C.set_threads(int(args.threads))
    import steerlin

    out = {"after_import_mib": C.peak_rss_mib()}
    model = steerlin.load_model(device=args.device)
    with torch.no_grad():
        model("The movie was great", return_type=None)
    out["after_model_mib"] = C.peak_rss_mib()
    out["param_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if args.stage == "model":
        C.child_result(out)
        return
    splits = C.sst2_splits(args.data_dir, args.concept_n, 3000, 0, seed=args.seed)
    dirs = steerlin.ConceptDirections.fit(
        model, C.texts(splits.concept), list(splits.concept.labels)
    )
    out["after_directions_mib"] = C.peak_rss_mib()
    ops = C.texts(splits.operating)
    if args.stage == "fit":
        prompts = long_prompts(model, ops, args.n, args.long_tokens)
        with C.RssSampler() as sampler:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, wall, cpu = C.timed(
                    lambda: steerlin.Surrogate.fit(
                        model, prompts, dirs, d=8, batch_size=args.batch_size
                    )
                )
        out |= {
            "after_fit_mib": C.peak_rss_mib(),
            "fit_sampled": sampler.reading(),
            "fit_s": wall,
            "fit_cpu_s": cpu,
            "n": len(prompts),
            "tokens": args.long_tokens,
        }
    else:  # threads
        prompts = ops[: args.n]
        bs = args.batch_size
        steerlin.scan_gains(model, prompts[:4], dirs, batch_size=bs)  # warm-up
        for name, fn in (
            ("scan", lambda: steerlin.scan_gains(model, prompts, dirs, batch_size=bs)),
            ("exact", lambda: steerlin.exact_gains(model, prompts, dirs, batch_size=bs)),
            ("fit d=8", lambda: steerlin.Surrogate.fit(model, prompts, dirs, d=8, batch_size=bs)),
        ):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, wall, cpu = timed(fn, args.device)
            out[name] = {"time_s": wall, "cpu_s": cpu}
    C.child_result(out)


def run_child(args, stage: str, threads: int, n: int) -> dict:
    flags = ["--stage", stage, "--threads", threads, "--n", n, "--device", args.device]
    flags += ["--concept-n", args.concept_n, "--batch-size", args.batch_size]
    flags += ["--data-dir", args.data_dir, "--seed", args.seed, "--long-tokens", args.long_tokens]
    return C.run_child(__file__, flags, f"{stage} (threads={threads}, n={n})")[0]


# ------------------------------------------------------------------------------ profile


def profile_step(model, short, long_, dirs, args, step: str) -> str:
    """torch.profiler table (top ops by self CPU time) of one step: scan|fit|exact-short|long."""
    from torch.profiler import ProfilerActivity, profile

    from steerlin import Surrogate, exact_gains, scan_gains

    what, _, which = step.partition("-")
    prompts = long_ if which == "long" else short
    fns = {
        "scan": lambda: scan_gains(model, prompts, dirs, batch_size=args.batch_size),
        "exact": lambda: exact_gains(model, prompts, dirs, batch_size=args.batch_size),
        "fit": lambda: Surrogate.fit(model, prompts, dirs, d=8, batch_size=args.batch_size),
    }
    if what not in fns:
        raise SystemExit(f"--profile: expected scan|exact|fit-short|long, got {step!r}")
    with warnings.catch_warnings(), profile(activities=[ProfilerActivity.CPU]) as prof:
        warnings.simplefilter("ignore")
        fns[what]()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# ------------------------------------------------------------------------------ main


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-short", type=int, default=None, help="short prompts (64; quick 16)")
    p.add_argument("--n-long", type=int, default=None, help="256-token prompts (8; quick 2)")
    p.add_argument("--long-tokens", type=int, default=256)
    p.add_argument("--concept-n", type=int, default=None, help="concept prompts per class (50)")
    p.add_argument("--rss-n", type=int, default=None, help="prompts for peak RSS (400; quick 16)")
    p.add_argument("--skip", default="", help=f"comma list of steps to skip: {','.join(STEPS)}")
    p.add_argument(
        "--profile", default=None, help="also profile one step: scan|fit|exact-short|long"
    )
    p.add_argument("--child", action="store_true", help=C.HIDDEN)
    p.add_argument("--n", type=int, default=0, help=C.HIDDEN)
    p.add_argument("--stage", default="fit", help=C.HIDDEN)
    args = p.parse_args()
    args.concept_n = args.concept_n or (8 if args.quick else 50)
    if args.child:
        child(args)
        return
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(STEPS):
        raise SystemExit(f"--skip: unknown steps {sorted(skip - set(STEPS))}; known: {STEPS}")
    args.steps = [s for s in STEPS if s not in skip]
    counts = C.thread_counts(args.threads)
    C.set_threads(counts[0])
    q = args.quick
    n_short = args.n_short or (16 if q else 64)
    n_long = args.n_long or (2 if q else 8)
    args.scale_n = [8, 16] if q else [16, 32, 64]
    args.scale_d = [4, 8] if q else [4, 8, 16, 32]
    args.scale_T = [32, 64] if q else [32, 64, 128, 256]
    env = C.environment(args)
    env["threads"] = counts[0]
    env["device"] = args.device

    import steerlin
    from steerlin.surrogate import DEFAULT_BASIS

    t0 = time.perf_counter()
    model = steerlin.load_model(device=args.device)
    L = model.cfg.n_layers
    splits = C.sst2_splits(args.data_dir, args.concept_n, 300, 0, seed=args.seed)
    dirs = steerlin.ConceptDirections.fit(
        model, C.texts(splits.concept), list(splits.concept.labels)
    )
    ops = C.texts(splits.operating)
    short = ops[:n_short]
    long_ = long_prompts(model, ops[n_short:], n_long, args.long_tokens)
    res: dict = {"default_basis": DEFAULT_BASIS, "n_layers": L}
    rows = measure_set(model, "short", short, dirs, args, res, min(16, n_short), 8 if not q else 4)
    rows += measure_set(model, "long", long_, dirs, args, res, min(2, n_long), 1)
    res["rows"] = rows
    if "scaling" in args.steps:
        C.say("scaling: fit vs n, d, T")
        res["scaling"] = scaling(model, short, long_, dirs, args)
    if "jvp" in args.steps:
        res["jvp"] = jvp_micro(model, short, args)
    if args.profile:
        res["profile"] = profile_step(model, short, long_, dirs, args, args.profile)
    res["main_process_s"] = time.perf_counter() - t0
    del model
    C.write_results("engine", args, env, {"goals": GOALS, **res})  # kept if a child fails
    children = []
    if "threads" in args.steps:
        children += [("thread_scaling", t, "threads", 16 if q else 32) for t in (1, 2)]
    if "rss" in args.steps:
        children += [("rss_model", None, "model", 0)]
        children += [("rss_fit", None, "fit", args.rss_n or (16 if q else 400))]
    for key, t, stage, n in children:
        try:
            out = run_child(args, stage, t or counts[0], n)
        except SystemExit as exc:  # report what failed, keep the rest
            out = {"error": str(exc)}
        if t is None:
            res[key] = out
        else:
            res.setdefault(key, {})[t] = out
    report(res, args)
    C.write_results("engine", args, env, {"goals": GOALS, **res})


if __name__ == "__main__":
    main()
