"""bench_engine.py's measurements: prompts and their work bound, timing against a batched
full forward, and the sections (scan / exact / fit per prompt set, cost vs n, d and T, the
JVP micro-benchmark). See bench_engine.py's docstring for what each measures."""

from __future__ import annotations

import math
import warnings

import _common as C
import torch

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
