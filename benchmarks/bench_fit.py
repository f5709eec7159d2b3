"""Surrogate.fit and exact_gains against what they replace, and JVP throughput, on Gemma-3-270m.

1. Surrogate.fit (d=32) on N SST-2 operating prompts vs the hook scan it replaces (scan_gains
   method="hooks": 2L full forwards per batch) on the same N prompts. Goal: fit >= 20x cheaper.
   The hook scan is timed on the first --scan-n prompts and extrapolated to N in proportion
   to the padded tokens its batched full forwards process (the output says so; the naive
   per-prompt extrapolation is reported too).
2. exact_gains vs the floor of one forward + one backward per prompt: a full-sequence forward
   with a gradient w.r.t. per-layer amplitudes u[p, l] hooked into every resid_pre at the last
   token, read out at the end, and one backward. Goal: exact_gains within 2x of the floor.
   The two gradients are compared too (they are the same quantity).
3. JVP throughput (tangent-prompt products per second) at one layer: FrozenContext.jvp
   (torch.func.jvp vmapped over the k tangents) vs a Python loop of torch.func.jvp.

    python benchmarks/bench_fit.py                 # N=200, hook scan timed on 16 prompts
    python benchmarks/bench_fit.py --quick         # N=16, hook scan on 8
    python benchmarks/bench_fit.py --threads 1,2
"""

from __future__ import annotations

import math

import _common as C
import torch


def floor_forward_backward(model, prompts, dirs, batch_size: int) -> torch.Tensor:
    """Per-prompt dy/du_l by hooking u[:, l] * b_l into every resid_pre (last real token) of a
    full-sequence forward and one backward: the floor exact_gains is compared with."""
    from steerlin.trajectory import iter_batches, pad_id, tokenize

    L = model.cfg.n_layers
    b = dirs.b[:L].to(model.cfg.dtype)
    unit_L = dirs.unit[-1].to(model.cfg.dtype)
    ids = tokenize(model, prompts)
    out = torch.zeros(len(ids), L, dtype=torch.float64)
    final = f"blocks.{L - 1}.hook_resid_post"
    for bt in iter_batches(ids, batch_size, pad=pad_id(model)):
        rows = torch.arange(len(bt.index))
        last = bt.lengths - 1
        mask = torch.zeros(len(rows), bt.tokens.shape[1], 1, dtype=model.cfg.dtype)
        mask[rows, last] = 1
        got = {}
        with torch.enable_grad():
            u = torch.zeros(len(rows), L, dtype=model.cfg.dtype, requires_grad=True)

            def make(layer):
                return lambda resid, hook: resid + mask * (u[:, layer, None] * b[layer])[:, None]

            hooks = [(f"blocks.{layer}.hook_resid_pre", make(layer)) for layer in range(L)]
            hooks.append((final, lambda r, hook: got.__setitem__("x", r[rows, last])))
            model.run_with_hooks(bt.tokens, return_type=None, fwd_hooks=hooks)
            y = got["x"] @ unit_L
            (g,) = torch.autograd.grad(y.sum(), u)
        out[bt.index] = g.double()
    return out


def padded_tokens(model, prompts, batch_size: int) -> int:
    """Tokens the batched full forwards process (right-padded, length-sorted batches)."""
    from steerlin.trajectory import iter_batches, tokenize

    return sum(b.tokens.numel() for b in iter_batches(tokenize(model, prompts), batch_size))


def jvp_throughput(ctx, layer: int, k: int, repeats: int) -> dict:
    """Tangent-prompt products per second: vmapped FrozenContext.jvp vs a Python loop."""
    gen = torch.Generator().manual_seed(0)
    tang = torch.randn(len(ctx), k, ctx.states.shape[-1], generator=gen, dtype=ctx.states.dtype)
    x = ctx.states[:, layer]
    f = lambda x_: ctx.block(layer, x_)

    def loop():
        return torch.stack([torch.func.jvp(f, (x,), (tang[:, j],))[1] for j in range(k)], dim=1)

    ctx.jvp(layer, tang[:, :2])  # warm-up
    vm = C.repeat(lambda: ctx.jvp(layer, tang), repeats)
    lp = C.repeat(loop, repeats)
    diff = float((vm["result"] - lp["result"]).abs().max() / lp["result"].abs().max())
    products = len(ctx) * k
    return {
        "batch": len(ctx),
        "k": k,
        "layer": layer,
        "vmap_s": vm["wall_median"],
        "loop_s": lp["wall_median"],
        "vmap_products_per_s": products / vm["wall_median"],
        "loop_products_per_s": products / lp["wall_median"],
        "vmap_speedup": lp["wall_median"] / vm["wall_median"],
        "vmap_speedup_cpu": lp["cpu_median"] / vm["cpu_median"],
        "max_rel_diff": diff,
    }


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0], n=200)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--scan-n", type=int, default=None, help="hook-scan prompts (16; quick 8)")
    p.add_argument("--concept-n", type=int, default=None, help="concept prompts per class (100)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--jvp-k", type=int, default=32, help="tangents per prompt for throughput")
    args = p.parse_args()
    counts = C.thread_counts(args.threads)
    C.set_threads(counts[0])
    n = C.pick(args, 200, 16)
    scan_n = min(args.scan_n or (8 if args.quick else 16), n)
    n_concept = args.concept_n or (8 if args.quick else 100)
    env = C.environment(args)

    from steerlin import ConceptDirections, Surrogate, exact_gains, iter_contexts, scan_gains

    model = C.load_gemma()
    L = model.cfg.n_layers
    splits = C.sst2_splits(args.data_dir, n_concept, math.ceil(n / 2), 0, seed=args.seed)
    ops = C.texts(splits.operating)[:n]
    dirs = ConceptDirections.fit(model, C.texts(splits.concept), list(splits.concept.labels))
    bs = args.batch_size

    rows_fit, rows_exact, rows_jvp = [], [], []
    for threads in counts:
        C.set_threads(threads)
        Surrogate.fit(model, ops[:4], dirs, d=4, batch_size=bs)  # warm-up
        C.say(f"threads={threads}: Surrogate.fit d={args.d} on {n}")
        sur, t_fit, cpu_fit = C.timed(
            lambda: Surrogate.fit(model, ops, dirs, d=args.d, batch_size=bs)
        )
        C.say(f"threads={threads}: fit {t_fit:.1f} s; hook scan on {scan_n}")
        _, t_scan, cpu_scan = C.timed(
            lambda: scan_gains(model, ops[:scan_n], dirs, method="hooks", batch_size=bs)
        )
        # The hook scan runs 2L full forwards of every padded batch, so its cost is linear in
        # the padded token count; extrapolating per prompt instead would charge all N prompts
        # the padding of one small unsorted batch.
        scale_prompts = n / scan_n
        scale = padded_tokens(model, ops, bs) / padded_tokens(model, ops[:scan_n], bs)
        t_scan_n, cpu_scan_n = t_scan * scale, cpu_scan * scale
        rows_fit.append(
            {
                "threads": threads,
                "n": n,
                "d": args.d,
                "fit_s": t_fit,
                "fit_ms_per_prompt": 1e3 * t_fit / n,
                "hook_scan_n": scan_n,
                "hook_scan_s": t_scan,
                "hook_scan_s_at_n": t_scan_n,
                "extrapolated": scan_n < n,
                "ratio": t_scan_n / t_fit,
                "ratio_cpu": cpu_scan_n / cpu_fit,
                "ratio_per_prompt_extrapolation": t_scan * scale_prompts / t_fit,
            }
        )
        C.say(f"threads={threads}: exact_gains on {n}")
        g_exact, t_ex, cpu_ex = C.timed(
            lambda: exact_gains(model, ops, dirs, batch_size=bs, per_prompt=True)
        )
        C.say(f"threads={threads}: floor forward+backward on {n}")
        g_floor, t_fl, cpu_fl = C.timed(lambda: floor_forward_backward(model, ops, dirs, bs))
        d = (g_exact - g_floor).abs().max() / g_floor.abs().max()
        rows_exact.append(
            {
                "threads": threads,
                "n": n,
                "exact_s": t_ex,
                "floor_s": t_fl,
                "exact_over_floor": t_ex / t_fl,
                "exact_over_floor_cpu": cpu_ex / cpu_fl,
                "max_abs_diff_over_max": float(d),
            }
        )
        ctx = next(iter(iter_contexts(model, ops[:bs], batch_size=bs)))
        rows_jvp.append({"threads": threads, **jvp_throughput(ctx, L // 2, args.jvp_k, 3)})
        del sur

    print("Surrogate.fit vs the hook scan it replaces (goal: ratio >= 20)")
    print(C.table(rows_fit))
    print("\nexact_gains vs one forward + one backward per prompt (goal: exact_over_floor <= 2)")
    print(C.table(rows_exact))
    print("\nJVP throughput (tangent-prompt products per second)")
    print(C.table(rows_jvp))
    for r in rows_fit:
        note = (
            f" (hook scan extrapolated from {r['hook_scan_n']} prompts)"
            if r["extrapolated"]
            else ""
        )
        print(
            f"threads={r['threads']}: fit {r['ratio']:.1f}x cheaper than the hook scan{note}: "
            f"{C.verdict(r['ratio'], 20, at_least=True)} >= 20x"
        )
    for r in rows_exact:
        print(
            f"threads={r['threads']}: exact_gains {r['exact_over_floor']:.2f}x the floor: "
            f"{C.verdict(r['exact_over_floor'], 2, at_least=False)} <= 2x"
        )
    C.write_results(
        "bench_fit",
        args,
        env,
        {
            "config": {
                "n": n,
                "d": args.d,
                "scan_n": scan_n,
                "batch_size": bs,
                "n_concept_per_class": n_concept,
                "n_layers": L,
                "jvp_k": args.jvp_k,
            },
            "goals": {"fit_ratio_at_least": 20, "exact_over_floor_at_most": 2},
            "fit": rows_fit,
            "exact": rows_exact,
            "jvp": rows_jvp,
        },
    )


if __name__ == "__main__":
    main()
