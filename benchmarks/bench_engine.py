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

Writes benchmarks/results/engine.json (engine_quick.json with --quick).
"""

from __future__ import annotations

import math
import os
import time
import warnings

import _common as C
import torch

GOALS = {
    "bound_fraction_at_least": 0.8,  # scan and fit, short and long prompts
    "hook_ratio_fraction_of_bound_at_least": 0.8,
    "fit_d8_over_exact_at_most": 2.0,
    "rss_gib_at_most": 4.0,
}
STEPS = ("scan", "exact", "fit", "hooks", "tl", "scaling", "jvp", "threads", "rss")


# ------------------------------------------------------------------------------ prompts, work


def long_prompts(model, texts: list[str], n: int, tokens: int) -> list[list[int]]:
    """n token-id prompts of exactly `tokens` tokens (BOS + consecutive SST-2 sentences joined,
    cut at `tokens`): equal lengths, so no padding and T is what it says. If the sentences run
    out they are reused from the start, shifted by one sentence per pass (distinct prompts)."""
    out, i, passes = [], 0, 0
    while len(out) < n:
        ids = model.to_tokens("")[0].tolist()
        while len(ids) < tokens:
            if i >= len(texts):
                passes += 1
                i = passes % len(texts)
            ids += model.to_tokens(" " + texts[i], prepend_bos=False)[0].tolist()
            i += 1
        out.append(ids[:tokens])
    return out


def batches(model, prompts, batch_size: int):
    from steerlin.tokens import iter_batches, pad_id, tokenize

    ids = tokenize(model, prompts)
    return list(iter_batches(ids, batch_size, pad=pad_id(model), device=model.cfg.device))


def token_stats(model, prompts, batch_size: int) -> dict:
    from steerlin.tokens import tokenize

    ids = tokenize(model, prompts)
    bt = batches(model, prompts, batch_size)
    padded = sum(b.tokens.numel() for b in bt)
    return {
        "n": len(ids),
        "mean_tokens": sum(map(len, ids)) / len(ids),
        "max_tokens": max(map(len, ids)),
        "padded_tokens": padded,
        "mean_padded_tokens": padded / len(ids),
    }


def work(kind: str, L: int, padded: int, n: int, d: int = 0) -> int:
    """Block-token evaluations of one method (see the module docstring)."""
    ctx = L * padded
    if kind == "scan":
        return ctx + n * L * (L + 1)
    if kind == "hooks":
        return 2 * L * ctx
    if kind == "exact":
        return ctx + 3 * n * L
    if kind == "fit":
        return ctx + n * L * (d + 1)
    if kind == "fit two-sided":  # observability pass + the sweep's own forward
        return 2 * ctx + n * L * (d + 4)
    raise ValueError(kind)


def work_two_sided(L: int, padded: int, n: int, d: int, held: int) -> int:
    """`fit two-sided` when `held` of the n prompts kept their full contexts from the
    observability pass (no second forward for them): the context forward counted once for
    those, twice for the rest (padding shared pro rata)."""
    ctx = L * padded
    return ctx + round(ctx * (n - held) / n) + n * L * (d + 4)


# ------------------------------------------------------------------------------ timing


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    def run():
        out = fn()
        sync(device)
        return out

    sync(device)
    return C.timed(run)


def forward_unit(model, prompts, batch_size: int, device: str, repeats: int = 2) -> dict:
    """Seconds per block-token of TransformerLens's batched full forward (same batches)."""
    bt = batches(model, prompts, batch_size)
    padded = sum(b.tokens.numel() for b in bt)
    L = model.cfg.n_layers

    def fwd():
        with torch.no_grad():
            for b in bt:
                model(b.tokens, attention_mask=torch.ones_like(b.tokens), return_type=None)

    fwd()  # warm-up
    best = min((timed(fwd, device) for _ in range(repeats)), key=lambda r: r[1])
    return {
        "forward_s": best[1],
        "forward_cpu_s": best[2],
        "unit_s": best[1] / (padded * L),
        "unit_cpu_s": best[2] / (padded * L),
    }


def step_row(name, t, cpu, w, unit, **extra) -> dict:
    """Bound fractions in wall time and in process CPU time (the steadier on a shared machine:
    with one thread it is the time this process computed, not the time it waited)."""
    return {
        "step": name,
        "time_s": t,
        "cpu_s": cpu,
        "block_tokens": w,
        "bound_s": w * unit["unit_s"],
        "bound_fraction": w * unit["unit_s"] / t,
        "bound_fraction_cpu": w * unit["unit_cpu_s"] / cpu,
        **extra,
    }


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------ sections


def measure_set(model, label, prompts, dirs, args, res, sub_n: int, hooks_n: int) -> list[dict]:
    """Scan / exact / fit on one prompt set, each with its work bound; hooks and tl on subsets."""
    from steerlin import Surrogate, exact_gains, scan_gains
    from steerlin.surrogate import DEFAULT_BASIS

    dev, bs, L = args.device, args.batch_size, model.cfg.n_layers
    st = token_stats(model, prompts, bs)
    unit = forward_unit(model, prompts, bs, dev)
    res[f"{label}_tokens"] = st
    res[f"{label}_forward"] = unit
    u, P, n = unit, st["padded_tokens"], st["n"]
    C.say(
        f"{label}: {n} prompts, {st['mean_tokens']:.1f} tokens ({st['mean_padded_tokens']:.1f} "
        f"padded); forward {1e6 * u['unit_s']:.0f} us per block-token"
    )
    rows = []
    want = set(args.steps)
    warm = prompts[: min(4, n)]
    if "scan" in want:
        scan_gains(model, warm, dirs, batch_size=bs)
        g, t, cpu = timed(lambda: scan_gains(model, prompts, dirs, batch_size=bs), dev)
        rows.append(step_row("scan (cached, fast)", t, cpu, work("scan", L, P, n), u))
        res[f"{label}_scan_gains"] = g.tolist()
    if "exact" in want:
        exact_gains(model, warm, dirs, batch_size=bs)
        ex, t_ex, cpu_ex = timed(lambda: exact_gains(model, prompts, dirs, batch_size=bs), dev)
        rows.append(step_row("exact_gains", t_ex, cpu_ex, work("exact", L, P, n), u))
    if "fit" in want:
        other = "krylov" if DEFAULT_BASIS != "krylov" else "two-sided"
        Surrogate.fit(model, warm, dirs, d=4, batch_size=bs)
        plans = [(DEFAULT_BASIS, 8, None), (other, 8, None), (DEFAULT_BASIS, 32, None)]
        if DEFAULT_BASIS in ("two-sided", "observable"):
            plans.insert(1, (DEFAULT_BASIS, 8, 0))  # streamed throughout: the memory floor
        for basis, d, budget in plans:
            kw = {} if budget is None else {"context_memory": budget}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sur, t, cpu = timed(
                    lambda b=basis, d=d, kw=kw: Surrogate.fit(
                        model, prompts, dirs, d=d, basis=b, batch_size=bs, **kw
                    ),
                    dev,
                )
            if basis in ("two-sided", "observable"):
                held = int(sur.meta["held_prompts"])
                w = work_two_sided(L, P, n, d, held)
            else:
                held, w = 0, work("fit", L, P, n, d)
            tag = " (default)" if basis == DEFAULT_BASIS and budget is None else ""
            tag += " streamed (context_memory=0)" if budget == 0 else ""
            row = step_row(f"fit d={d} {basis}{tag}", t, cpu, w, u, held_prompts=held)
            if "exact" in want:
                row["over_exact"] = t / t_ex
                row["over_exact_cpu"] = cpu / cpu_ex
            rows.append(row)
    sub = prompts[:sub_n]
    if "tl" in want:  # the reference engine on a subset: speed-up and agreement
        ps = token_stats(model, sub, bs)["padded_tokens"]
        for what, fn in (
            ("scan", lambda e: scan_gains(model, sub, dirs, batch_size=bs, engine=e)),
            ("exact", lambda e: exact_gains(model, sub, dirs, batch_size=bs, engine=e)),
            (
                "fit d=8 krylov",
                lambda e: (
                    Surrogate.fit(
                        model, sub, dirs, d=8, basis="krylov", batch_size=bs, engine=e
                    ).gains
                ),
            ),
        ):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gf, tf, cf = timed(lambda: fn("fast"), dev)
                gt, tt, ct = timed(lambda: fn("tl"), dev)
            kind = {"scan": "scan", "exact": "exact"}.get(what, "fit")
            w = work(kind, L, ps, len(sub), 8)
            res.setdefault(f"{label}_fast_vs_tl", []).append(
                {
                    "step": what,
                    "n": len(sub),
                    "fast_s": tf,
                    "tl_s": tt,
                    "speedup": tt / tf,
                    "speedup_cpu": ct / cf,
                    "fast_bound_fraction_cpu": w * u["unit_cpu_s"] / cf,
                    "tl_bound_fraction_cpu": w * u["unit_cpu_s"] / ct,
                    "gains_rel_diff": rel(gf, gt),
                }
            )
    if "hooks" in want:
        hsub = prompts[:hooks_n]
        hp = token_stats(model, hsub, bs)["padded_tokens"]
        gc, tc, cc = timed(lambda: scan_gains(model, hsub, dirs, batch_size=bs), dev)
        C.say(f"{label}: hook scan on {len(hsub)} prompts ({2 * L} full forwards per batch)")
        gh, th, ch = timed(
            lambda: scan_gains(model, hsub, dirs, batch_size=bs, method="hooks"), dev
        )
        bound = work("hooks", L, hp, len(hsub)) / work("scan", L, hp, len(hsub))
        T = hp / len(hsub)
        res[f"{label}_hooks"] = {
            "n": len(hsub),
            "cached_s": tc,
            "hooks_s": th,
            "ratio": th / tc,
            "ratio_cpu": ch / cc,
            "bound": bound,
            "bound_formula_2LT_over_T_L_1": 2 * L * T / (T + L + 1),
            "fraction_of_bound": th / tc / bound,
            "gains_rel_diff": rel(gc, gh),
            "fraction_of_bound_cpu": ch / cc / bound,
            "hooks_bound_fraction_cpu": work("hooks", L, hp, len(hsub)) * u["unit_cpu_s"] / ch,
        }
    for r in rows:
        r["prompts"] = label
    return rows


def scaling(model, short, long_, dirs, args) -> dict:
    """Fit d=8 (default basis) time vs n, vs d, vs T; scan vs T; log-log exponents."""
    from steerlin import Surrogate, scan_gains

    dev, bs = args.device, args.batch_size
    out = {"n": [], "d": [], "T": []}

    def fit(prompts, d):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timed(lambda: Surrogate.fit(model, prompts, dirs, d=d, batch_size=bs), dev)

    for n in args.scale_n:
        _, t, cpu = fit(short[:n], 8)
        out["n"].append({"n": n, "d": 8, "time_s": t, "cpu_s": cpu})
    for d in args.scale_d:
        n = args.scale_n[-2] if len(args.scale_n) > 1 else args.scale_n[0]
        _, t, cpu = fit(short[:n], d)
        out["d"].append({"n": n, "d": d, "time_s": t, "cpu_s": cpu})
    for T in args.scale_T:
        prompts = [p[:T] for p in long_]
        _, t, cpu = fit(prompts, 8)
        _, ts, _ = timed(lambda p=prompts: scan_gains(model, p, dirs, batch_size=bs), dev)
        out["T"].append({"T": T, "n": len(prompts), "fit_s": t, "fit_cpu_s": cpu, "scan_s": ts})
    out["exponent_n"] = slope([r["n"] for r in out["n"]], [r["time_s"] for r in out["n"]])
    out["exponent_d"] = slope([r["d"] for r in out["d"]], [r["time_s"] for r in out["d"]])
    out["exponent_T_fit"] = slope([r["T"] for r in out["T"]], [r["fit_s"] for r in out["T"]])
    out["exponent_T_scan"] = slope([r["T"] for r in out["T"]], [r["scan_s"] for r in out["T"]])
    return out


def slope(x, y) -> float | None:
    if len(x) < 2:
        return None
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def jvp_micro(model, prompts, args) -> list[dict]:
    """One block's JVPs for k tangents per prompt: fast.block_jvp (one primal, batched
    tangents) vs torch.func.jvp vmapped over the fast block, torch.func.linearize once and
    its linear map vmapped, and the TL engine's FrozenContext.jvp."""
    from steerlin.backend import fast
    from steerlin.frozen import iter_contexts

    dev, bs = args.device, args.batch_size
    layer = model.cfg.n_layers // 2
    f_ctx = next(iter(iter_contexts(model, prompts[:bs], batch_size=bs)))
    t_ctx = next(iter(iter_contexts(model, prompts[:bs], batch_size=bs, engine="tl")))
    x = f_ctx.states[:, layer]
    f = lambda x_: fast.block(model, f_ctx.kv, layer, x_)
    rows = []
    for k in (8, 32):
        gen = torch.Generator().manual_seed(k)
        v = torch.randn(len(f_ctx), k, x.shape[-1], generator=gen).to(x)

        def vjp_():
            return torch.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1], 1, 1)(v)

        def lin_():
            _, lin = torch.func.linearize(f, x)
            return torch.vmap(lin, 1, 1)(v)

        methods = {
            "fast.block_jvp": lambda: fast.block_jvp(model, f_ctx.kv, layer, x, v)[1],
            "func.jvp vmapped (fast block)": vjp_,
            "func.linearize + vmap (fast block)": lin_,
            "tl FrozenContext.jvp": lambda: t_ctx.jvp(layer, v),
        }
        ref = None
        for name, fn in methods.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()  # warm-up
                reps = 1 if "linearize" in name else 3  # ~1-4 s a call: it retraces each time
                r = C.repeat(lambda fn=fn: (fn(), sync(dev))[0], reps)
            ref = r["result"] if ref is None else ref
            rows.append(
                {
                    "k": k,
                    "method": name,
                    "median_s": r["wall_median"],
                    "median_cpu_s": r["cpu_median"],
                    "products_per_s": len(f_ctx) * k / r["wall_median"],
                    "rel_diff_vs_block_jvp": rel(r["result"], ref),
                }
            )
    return rows


# ------------------------------------------------------------------------------ children


def peak_mib() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak
    across fork + exec into the child's ru_maxrss, and this parent holds a loaded model."""
    hwm = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return C.max_rss_mib() if hwm is None else hwm


def child(args) -> None:
    """In a fresh interpreter: --stage model | fit (RSS) | threads (timings)."""
    C.set_threads(int(args.threads))
    import steerlin

    out = {"after_import_mib": peak_mib()}
    model = steerlin.load_model(device=args.device)
    with torch.no_grad():
        model("The movie was great", return_type=None)
    out["after_model_mib"] = peak_mib()
    out["param_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if args.stage == "model":
        C.child_result(out)
        return
    splits = C.sst2_splits(args.data_dir, args.concept_n, 3000, 0, seed=args.seed)
    dirs = steerlin.ConceptDirections.fit(
        model, C.texts(splits.concept), list(splits.concept.labels)
    )
    out["after_directions_mib"] = peak_mib()
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
            "after_fit_mib": peak_mib(),
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


def report(res: dict, args) -> None:
    """Print every table and the summary against the goals."""
    print("\nMeasured time / work-bound time (block-token evaluations x forward cost per token)")
    for label in ("short", "long"):
        if f"{label}_tokens" not in res:
            continue
        st, fw = res[f"{label}_tokens"], res[f"{label}_forward"]
        print(
            f"\n{label}: {st['n']} prompts, {st['mean_tokens']:.1f} tokens "
            f"({st['mean_padded_tokens']:.1f} padded), forward {fw['forward_s']:.2f} s = "
            f"{1e6 * fw['unit_s']:.0f} us per block-token"
        )
        rows = [r for r in res["rows"] if r["prompts"] == label]
        print(
            C.table(
                rows,
                [
                    "step",
                    "time_s",
                    "cpu_s",
                    "bound_s",
                    "bound_fraction",
                    "bound_fraction_cpu",
                    "over_exact",
                    "over_exact_cpu",
                    "held_prompts",
                ],
            )
        )
        if f"{label}_fast_vs_tl" in res:
            print(f"engine='fast' vs engine='tl' on {res[f'{label}_fast_vs_tl'][0]['n']} prompts")
            print(C.table(res[f"{label}_fast_vs_tl"]))
        if f"{label}_hooks" in res:
            h = res[f"{label}_hooks"]
            print(
                f"hook scan vs cached scan on {h['n']} prompts: {h['hooks_s']:.1f} s / "
                f"{h['cached_s']:.2f} s = {h['ratio']:.1f}x (CPU {h['ratio_cpu']:.1f}x); bound "
                f"{h['bound']:.1f}x, fraction {h['fraction_of_bound']:.2f}; gains differ by "
                f"{h['gains_rel_diff']:.1e}"
            )
    if "scaling" in res:
        s = res["scaling"]
        print("\nfit d=8 vs n (short):", C.table(s["n"]), sep="\n")
        print("fit vs d (short):", C.table(s["d"]), sep="\n")
        print("fit d=8 and scan vs prompt length T:", C.table(s["T"]), sep="\n")
        print(
            f"exponents: n^{fmt(s['exponent_n'])}, d^{fmt(s['exponent_d'])}, "
            f"fit T^{fmt(s['exponent_T_fit'])}, scan T^{fmt(s['exponent_T_scan'])}"
        )
    if "jvp" in res:
        print("\nJVP at one block, 16 prompts x k tangents:", C.table(res["jvp"]), sep="\n")
    th = {t: r for t, r in res.get("thread_scaling", {}).items() if "error" not in r}
    if th:
        rows = []
        for name in ("scan", "exact", "fit d=8"):
            row = {"step": name}
            for t, r in th.items():
                row[f"{t} thread(s) s"] = r[name]["time_s"]
            if 1 in th and 2 in th:
                row["speedup 2 vs 1"] = th[1][name]["time_s"] / th[2][name]["time_s"]
            rows.append(row)
        print("\nthreads (fresh subprocess each, 32 short prompts):", C.table(rows), sep="\n")
    ok = lambda k: k in res and "error" not in res[k]  # noqa: E731
    if ok("rss_fit") and ok("rss_model"):
        f, m = res["rss_fit"], res["rss_model"]
        print(
            f"\npeak RSS: model alone {m['after_model_mib']:.0f} MiB; fit d=8 on {f['n']} x "
            f"{f['tokens']} tokens {f['after_fit_mib']:.0f} MiB ({f['after_fit_mib'] / 1024:.2f} "
            f"GiB) in {f['fit_s']:.0f} s"
        )
    if "profile" in res:
        print(f"\nprofile of {args.profile}:\n{res['profile']}")
    print("\nSummary against the goals")
    summary = []
    for r in res["rows"]:
        if r["step"].startswith(("scan", "fit d=8")):
            summary.append(
                {
                    "goal": f"{r['step']} ({r['prompts']}) >= 80% of bound",
                    "value": f"{100 * r['bound_fraction_cpu']:.0f}% CPU, "
                    f"{100 * r['bound_fraction']:.0f}% wall",
                    "verdict": C.verdict(r["bound_fraction_cpu"], 0.8, at_least=True),
                }
            )
    for label in ("short", "long"):
        h = res.get(f"{label}_hooks")
        if h:
            summary.append(
                {
                    "goal": f"hooks/cached ({label}) >= 0.8 x {h['bound']:.1f}",
                    "value": f"{h['ratio_cpu']:.1f}x CPU ({h['fraction_of_bound_cpu']:.2f} of "
                    f"bound), {h['ratio']:.1f}x wall",
                    "verdict": C.verdict(h["fraction_of_bound_cpu"], 0.8, at_least=True),
                }
            )
    for r in res["rows"]:
        if r["step"].startswith("fit d=") and "over_exact" in r:
            goal = "fit d=8 <= 2x exact" if r["step"].startswith("fit d=8") else "report"
            summary.append(
                {
                    "goal": f"{r['step']} / exact ({r['prompts']}): {goal}",
                    "value": f"{r['over_exact_cpu']:.2f}x CPU, {r['over_exact']:.2f}x wall",
                    "verdict": C.verdict(r["over_exact_cpu"], 2.0, at_least=False)
                    if goal != "report"
                    else "-",
                }
            )
    if ok("rss_fit"):
        gib = res["rss_fit"]["after_fit_mib"] / 1024
        summary.append(
            {
                "goal": f"peak RSS fit {res['rss_fit']['n']}x{res['rss_fit']['tokens']} <= 4 GiB",
                "value": f"{gib:.2f} GiB",
                "verdict": C.verdict(gib, 4.0, at_least=False),
            }
        )
    print(C.table(summary))
    res["summary"] = summary
    print(f"load average now {os.getloadavg()[0]:.2f}")


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
