"""scan_gains: the KV-cached single-token path (method="cached") vs TransformerLens hooks and one
full forward per layer and sign (method="hooks"), on the same SST-2 prompts, Gemma-3-270m.

Goals: hooks / cached time >= 100x; max relative difference of the gains <= 1e-4.

    python benchmarks/bench_scan.py                    # cached on 200 prompts, hooks on 48
    python benchmarks/bench_scan.py --hooks-n 200      # hooks on all 200 (~7 s/prompt: slow)
    python benchmarks/bench_scan.py --quick            # 16 prompts
    python benchmarks/bench_scan.py --threads 1,2      # each thread count
    python benchmarks/bench_scan.py --join 10 --n 32 --hooks-n 32 \
        --out benchmarks/results/bench_scan_long.json   # ~110-token prompts: the ratio grows with T

The hook scan costs 2L = 36 full forwards per batch, ~7 s per SST-2 prompt on one loaded core,
so by default it runs on the first 48 of the N prompts (--hooks-n). The headline `ratio` is
measured on the SAME prompts (cached scan timed again on that subset); `ratio_per_prompt`
compares the hook cost per prompt on the subset with the cached cost per prompt on all N.
The gains' difference is computed on the subset.

`ideal_ratio` is the ratio of block-token evaluations, 2L*L*sum(b*T) / (L*sum(b*T) + L(L+1)*n)
over the padded batches: the hook scan runs 2L full forwards of L blocks over T tokens, the
cached scan one full forward plus L(L+1) single-token block passes per prompt. It tends to 2L
(36 for Gemma-3-270m) for long prompts and is ~2LT/(T+L+1) for short ones, so a ratio of 100x
is out of reach of ANY implementation of the cached scan on an 18-layer model.
"""

from __future__ import annotations

import math

import _common as C
import torch


def rel_diff(ref: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Per-layer max |a-b|/|a|, where it occurs, and normwise max|a-b|/max|a| (a = hooks).

    The per-layer ratio is ill-conditioned at layers whose gain is near zero (float32 rounding
    of the readout is then most of the difference), so both are reported."""
    ref, other = ref.double(), other.double()
    d = (ref - other).abs()
    rel = d / ref.abs().clamp_min(1e-300)
    worst = int(rel.argmax())
    return {
        "max_rel_diff": float(rel.max()),
        "max_rel_diff_layer": worst,
        "gain_there_over_max_gain": float(ref[worst].abs() / ref.abs().max()),
        "max_abs_diff_over_max_gain": float(d.max() / ref.abs().max()),
    }


def ideal_ratio(model, prompts, batch_size: int) -> float:
    """Block-token evaluations of the hook scan over those of the cached scan (padded batches,
    as both methods batch them)."""
    from steerlin.trajectory import iter_batches, tokenize

    ids = tokenize(model, prompts)
    padded = sum(b.tokens.numel() for b in iter_batches(ids, batch_size))
    L = model.cfg.n_layers
    return 2 * L * L * padded / (L * padded + L * (L + 1) * len(ids))


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0], n=200)
    p.add_argument(
        "--hooks-n", type=int, default=None, help="prompts for the hook scan (default 48; quick N)"
    )
    p.add_argument("--concept-n", type=int, default=None, help="concept prompts per class (100)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument(
        "--join",
        type=int,
        default=1,
        help="join this many SST-2 sentences into one prompt (longer prompts; default 1)",
    )
    args = p.parse_args()
    counts = C.thread_counts(args.threads)
    C.set_threads(counts[0])
    n = C.pick(args, 200, 16)
    hooks_n = min(args.hooks_n or (n if args.quick else 48), n)
    n_concept = args.concept_n or (8 if args.quick else 100)
    env = C.environment(args)

    from steerlin import ConceptDirections, scan_gains

    model = C.load_gemma()
    splits = C.sst2_splits(
        args.data_dir, n_concept, 0, math.ceil(n * args.join / 2), seed=args.seed
    )
    sentences = C.texts(splits.eval)
    if args.join > 1:  # longer prompts: k consecutive eval sentences joined by spaces
        sentences = [
            " ".join(sentences[i : i + args.join])
            for i in range(0, len(sentences) - args.join + 1, args.join)
        ]
    prompts = sentences[:n]
    sub = prompts[:hooks_n]
    dirs = ConceptDirections.fit(model, C.texts(splits.concept), list(splits.concept.labels))
    ntok = [model.to_tokens(t).shape[1] for t in prompts]
    C.say(
        f"{n} prompts, {sum(ntok) / n:.1f} tokens on average (max {max(ntok)}); hooks on {hooks_n}"
    )
    kw = dict(eps=args.eps, batch_size=args.batch_size)
    L = model.cfg.n_layers

    rows = []
    for threads in counts:
        C.set_threads(threads)
        scan_gains(model, prompts[: args.batch_size], dirs, **kw)  # warm-up (allocator, kernels)
        C.say(f"threads={threads}: cached scan on {n}")
        g_cached, t_c, cpu_c = C.timed(lambda: scan_gains(model, prompts, dirs, **kw))
        C.say(
            f"threads={threads}: cached {t_c:.1f} s; hook scan on {hooks_n} "
            f"({2 * L} full forwards per batch)"
        )
        g_hooks, t_h, cpu_h = C.timed(lambda: scan_gains(model, sub, dirs, method="hooks", **kw))
        C.say(f"threads={threads}: hooks {t_h:.1f} s")
        if hooks_n == n:
            ref_cached, t_cs, cpu_cs = g_cached, t_c, cpu_c
        else:
            ref_cached, t_cs, cpu_cs = C.timed(lambda: scan_gains(model, sub, dirs, **kw))
        per_c, per_h = t_c / n, t_h / hooks_n
        row = {
            "threads": threads,
            "n_cached": n,
            "n_hooks": hooks_n,
            "cached_s": t_c,
            "cached_subset_s": t_cs,
            "hooks_s": t_h,
            "cached_ms_per_prompt": 1e3 * per_c,
            "hooks_ms_per_prompt": 1e3 * per_h,
            "ratio": t_h / t_cs,
            "ratio_cpu": cpu_h / cpu_cs,
            "ratio_per_prompt": per_h / per_c,
            "ideal_ratio": ideal_ratio(model, sub, args.batch_size),
            **rel_diff(g_hooks, ref_cached),
            "gains_cached": ref_cached.tolist(),
            "gains_hooks": g_hooks.tolist(),
        }
        rows.append(row)

    cols = [
        "threads",
        "n_cached",
        "n_hooks",
        "cached_s",
        "cached_subset_s",
        "hooks_s",
        "cached_ms_per_prompt",
        "hooks_ms_per_prompt",
        "ratio",
        "ratio_cpu",
        "ratio_per_prompt",
        "ideal_ratio",
        "max_rel_diff",
        "max_abs_diff_over_max_gain",
    ]
    print(C.table(rows, cols))
    for r in rows:
        print(
            f"threads={r['threads']}: ratio {r['ratio']:.1f}x "
            f"({C.verdict(r['ratio'], 100, at_least=True)} >= 100x; the work ratio bounds it at "
            f"{r['ideal_ratio']:.1f}x)"
        )
        print(
            f"  per-layer max rel diff {r['max_rel_diff']:.2e} at layer "
            f"{r['max_rel_diff_layer']} (gain there {r['gain_there_over_max_gain']:.2g} of the "
            f"largest): {C.verdict(r['max_rel_diff'], 1e-4, at_least=False)} <= 1e-4; normwise "
            f"{r['max_abs_diff_over_max_gain']:.2e}: "
            f"{C.verdict(r['max_abs_diff_over_max_gain'], 1e-4, at_least=False)} <= 1e-4"
        )
    C.write_results(
        "bench_scan",
        args,
        env,
        {
            "config": {
                "n": n,
                "hooks_n": hooks_n,
                "n_concept_per_class": n_concept,
                "batch_size": args.batch_size,
                "eps": args.eps,
                "n_layers": L,
                "join": args.join,
                "mean_tokens": sum(ntok) / n,
                "max_tokens": max(ntok),
            },
            "goals": {"ratio_at_least": 100, "max_rel_diff_at_most": 1e-4},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
