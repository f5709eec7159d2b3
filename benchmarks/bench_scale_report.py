"""The report of benchmarks/bench_scale.py: size table, goals' verdicts, 1 vs 2 threads, the
fitted cost model with its residuals, the Llama-3.1-8B extrapolation and the log-log plot.

    python benchmarks/bench_scale.py --report      # (or python benchmarks/bench_scale_report.py)

Reads benchmarks/results/scale_<shape>_<dtype>_t<threads>.json; writes
benchmarks/results/scale_summary.json and docs/img/cost_scaling.png; prints Markdown tables.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_scale import LLAMA_8B, SHAPES, STAGES  # noqa: E402

GIB = 2**30
PLOT = C.ROOT / "docs" / "img" / "cost_scaling.png"
GOAL_FIT_RATIO, GOAL_RSS_EXTRA_GIB, GOAL_GEN = 1.5, 1.5, 0.05
#: achieved throughput assumed on one 80 GB H100 (SXM peaks: bf16 dense 989, fp32 67 TFLOP/s)
BF16_FLOPS, FP32_FLOPS = 300e12, 30e12


def load_runs(quick: bool = False) -> list[dict]:
    sfx = "_quick" if quick else ""
    runs = []
    for shape in SHAPES:
        for path in sorted(C.RESULTS.glob(f"scale_{shape}_*_t*{sfx}.json")):
            if not quick and path.stem.endswith("_quick"):
                continue
            runs.append(json.loads(path.read_text()))
    return runs


def size_row(r: dict) -> dict:
    st, gen, L = r["stages"], r["generate"], r["n_layers"]
    n_t = r["workload"]["n_operating"] * r["workload"]["tokens"]
    fit_cpu = st["fit"]["cpu_s"] / st["exact"]["cpu_s"]
    fit_wall = st["fit"]["wall_s"] / st["exact"]["wall_s"]
    w_gib = r["weights_bytes"] / GIB
    fit_rss = st["fit"]["peak_vmrss_mib"] / 1024
    fit_tf = n_t + st["fit"]["chain_block_tokens"] / L
    computed = st["directions"]["token_forwards"] + fit_tf + st["calibrate"]["token_forwards"]
    return {
        "shape": r["shape"],
        "dtype": r["dtype"],
        "threads": r["threads"],
        "params_M": r["params"] / 1e6,
        "L": L,
        "weights_GiB": w_gib,
        **{f"{k}_cpu_s": st[k]["cpu_s"] for k in STAGES},
        **{f"{k}_wall_s": st[k]["wall_s"] for k in STAGES},
        **{f"{k}_tokfwd": st[k]["token_forwards"] for k in STAGES},
        # exact, fit, scan from the structure: n·T (one context forward; the default fit keeps
        # every context here, meta held_prompts) + the chain. The counter at blocks.0 misses a
        # bf16 model's context forward (built block by block in float32, no model hooks);
        # on float32 models it counts exactly n·T.
        **{f"{k}_tokfwd": n_t + st[k]["chain_block_tokens"] / L for k in ("exact", "fit", "scan")},
        **{f"{k}_rss_GiB": st[k]["peak_vmrss_mib"] / 1024 for k in STAGES},
        "fit_over_exact_cpu": fit_cpu,
        "fit_over_exact_wall": fit_wall,
        "fit_rss_GiB": fit_rss,
        "fit_rss_over_weights_GiB": fit_rss - w_gib,
        "model_alone_GiB": r["model_alone_rss_mib"] / 1024,
        "fit_rss_over_model_GiB": fit_rss - r["model_alone_rss_mib"] / 1024,
        "gen_plain_s": gen["plain_wall_s"],
        "gen_steered_s": gen["steered_wall_s"],
        "gen_overhead_wall": gen["overhead_wall"],
        "gen_overhead_cpu": gen["overhead_cpu"],
        "gen_overhead_best_cpu": min(c for _, c in gen["runs"]["steered"])
        / min(c for _, c in gen["runs"]["plain"])
        - 1,
        "computed_tokfwd": computed,
        "searched_tokfwd": r["search"]["token_forwards"],
        "searched_over_computed": r["search"]["token_forwards"] / computed,
        "searched_s_est": r["search"]["seconds_est"],
        "computed_wall_s": sum(st[k]["wall_s"] for k in ("directions", "fit", "calibrate")),
        "verdict_fit_time": fit_cpu <= GOAL_FIT_RATIO,
        "verdict_fit_rss": fit_rss - w_gib <= GOAL_RSS_EXTRA_GIB,
        "verdict_gen": gen["overhead_cpu"] <= GOAL_GEN,
        "compute_params": r["params_compute"],
        "d_model": r["d_model"],
        "load": r.get("loadavg_start", [None])[0],
    }


def threads_pairs(runs: list[dict]) -> list[dict]:
    """1- vs 2-thread wall (CPU) seconds of the core stages, same shape and dtype."""
    out = []
    for r2 in (r for r in runs if r["threads"] == 2):
        r1 = next((r for r in runs if r["threads"] == 1 and r["shape"] == r2["shape"]
                   and r["dtype"] == r2["dtype"]), None)  # fmt: skip
        if r1 is None:
            continue
        row = {"shape": r2["shape"], "dtype": r2["dtype"], "load_2t": r2["loadavg_start"][0]}
        for k in STAGES[:4]:
            a, b = r1["stages"][k], r2["stages"][k]
            row[k] = (f"{a['wall_s']:.1f} → {b['wall_s']:.1f} s ({a['cpu_s']:.1f} → "
                      f"{b['cpu_s']:.1f}): {a['wall_s'] / b['wall_s']:.2f}x")  # fmt: skip
        out.append(row)
    return out


def lstsq_loglog(xs: list[float], ys: list[float]) -> dict:
    """log y = a + b log x by least squares; residuals as y / fitted."""
    import numpy as np

    lx, ly = np.log(np.asarray(xs)), np.log(np.asarray(ys))
    A = np.stack([np.ones_like(lx), lx], 1)
    (a, b), *_ = np.linalg.lstsq(A, ly, rcond=None)
    res = ly - (a + b * lx)
    return {
        "a": float(a),
        "b": float(b),
        "k": float(math.exp(a)),
        "residual_factors": [float(math.exp(e)) for e in res],
        "rms_log_residual": float(np.sqrt(np.mean(res**2))),
    }


def fit_two_term(rs: list[dict]) -> dict:
    """fit CPU s = alpha · (compute params x token-forwards) + beta · L·H³ (the per-layer H x H
    eigendecompositions), linear least squares; residuals as measured / fitted."""
    import numpy as np

    A = np.array([[r["compute_params"] * r["fit_tokfwd"], r["L"] * r["d_model"] ** 3] for r in rs])
    y = np.array([r["fit_cpu_s"] for r in rs])
    (alpha, beta), *_ = np.linalg.lstsq(A, y, rcond=None)
    fitted = A @ np.array([alpha, beta])
    return {
        "alpha": float(alpha),
        "beta": float(beta),
        "residual_factors": [float(v) for v in y / fitted],
        "eig_share": [float(beta * a[1] / f) for a, f in zip(A, fitted, strict=True)],
    }


def cost_models(rows: list[dict]) -> dict:
    """Per dtype and stage: CPU seconds vs compute parameters x token-forwards (1 thread)."""
    out = {}
    for dt in sorted({r["dtype"] for r in rows}):
        rs = [r for r in rows if r["dtype"] == dt and r["threads"] == 1]
        if len(rs) < 3:
            continue
        for k in ("directions", "exact", "fit", "scan", "calibrate"):
            xs = [r["compute_params"] * r[f"{k}_tokfwd"] for r in rs]
            m = lstsq_loglog(xs, [r[f"{k}_cpu_s"] for r in rs])
            m["points"] = [(r["shape"], x, r[f"{k}_cpu_s"]) for r, x in zip(rs, xs, strict=True)]
            out[f"{dt}/{k}"] = m
        pooled = [
            (r["compute_params"] * r[f"{k}_tokfwd"], r[f"{k}_cpu_s"])
            for r in rs
            for k in ("directions", "exact", "fit", "scan")
        ]
        out[f"{dt}/pooled"] = lstsq_loglog([p[0] for p in pooled], [p[1] for p in pooled])
        out[f"{dt}/fit_two_term"] = fit_two_term(rs)
    return out


def llama8b(rows: list[dict], models: dict, workload: dict) -> dict:
    """Token-forwards of the 8B at this run's workload and the issue's, from the structure;
    CPU seconds from the bf16 cost model; a GPU estimate from FLOPs (assumptions in the doc)."""
    s = LLAMA_8B
    L, D, kv = s["n_layers"], s["d_model"], s["n_kv"] * s["d_head"]
    per_block = D * (s["n_heads"] * s["d_head"]) * 2 + D * kv * 2 + 3 * D * s["d_mlp"]
    P = L * per_block + D * s["d_vocab"]  # compute params (W_U counted, W_E not)
    total = P + D * s["d_vocab"]
    d = workload["d"]
    out = {
        "params": total,
        "params_compute": P,
        "weights_bf16_GiB": 2 * total / GIB,
        "block_fp32_GiB": 4 * per_block / GIB,
    }
    # calibrate: token-forwards per stem-token measured at the other sizes (same regime)
    cal = [r["calibrate_tokfwd"] for r in rows if r["threads"] == 1]
    for name, (n, T) in {
        "this": (workload["n_operating"], workload["tokens"]),
        "issue": (100, 64),
    }.items():
        tf = {
            "directions": n * T,
            "exact": n * T + n * 3,
            "fit": n * T + n * (d + 4),
            "scan": n * T + n * (L + 1),
        }
        if name == "this" and cal:
            tf["calibrate"] = max(cal)
        est = {}
        for k, v in tf.items():
            m = models.get(f"bfloat16/{k}") or models.get(f"float32/{k}")
            if m:
                est[k] = m["k"] * (P * v) ** m["b"]
        out[name] = {
            "n": n,
            "T": T,
            "token_forwards": tf,
            "cpu_s_1thread_est": est,
            # batched forwards (n·T) in bf16 at BF16_FLOPS; the single-token chain (the rest)
            # in float32 (steerlin upcasts one block at a time) at FP32_FLOPS
            "gpu_flop_s_lower_bound": {
                k: 2 * P * min(v, n * T) / BF16_FLOPS + 2 * P * max(v - n * T, 0) / FP32_FLOPS
                for k, v in tf.items()
                if k != "calibrate"
            },
        }
        kv_bytes = n * L * T * 2 * kv * 4
        out[name]["contexts_fp32_GiB"] = kv_bytes / GIB
    return out


def plot(rows: list[dict], models: dict, path: Path = PLOT) -> Path:
    """Left: stage CPU seconds vs compute parameters x token-forwards (log-log; float32 filled
    with its fitted line, bfloat16 open, dashed). Middle / right: the fit's time and memory
    goals vs parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    ax = axes[0]
    marks = {"directions": "o", "exact": "s", "fit": "D", "scan": "^", "calibrate": "v"}
    for i, (k, mk) in enumerate(marks.items()):
        color = f"C{i}"
        for dt, fill, ls in (("float32", color, "-"), ("bfloat16", "none", "--")):
            rs = [r for r in rows if r["dtype"] == dt]
            if not rs:
                continue
            xs = np.array([r["compute_params"] * r[f"{k}_tokfwd"] for r in rs])
            ys = np.array([r[f"{k}_cpu_s"] for r in rs])
            m = models.get(f"{dt}/{k}")
            lab = f"{k} {dt}" + (f": x^{m['b']:.2f}" if m else "")
            ax.scatter(xs, ys, marker=mk, facecolors=fill, edgecolors=color, label=lab, zorder=3)
            if m:
                xx = np.geomspace(xs.min(), xs.max(), 20)
                ax.plot(xx, m["k"] * xx ** m["b"], color=color, lw=1, ls=ls)
    for r in rows:
        if r["dtype"] == "float32":
            x, y = r["compute_params"] * r["exact_tokfwd"], r["exact_cpu_s"]
            ax.annotate(r["shape"], (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="compute parameters x token-forwards",
        ylabel="process CPU seconds (1 thread)",
        title="stage cost (CPU s)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    for ax, key, goal, ylab in (
        (axes[1], "fit_over_exact_cpu", GOAL_FIT_RATIO, "fit d=8 / exact gains (CPU time)"),
        (axes[2], "fit_rss_over_weights_GiB", GOAL_RSS_EXTRA_GIB, "fit peak RSS − weights (GiB)"),
    ):
        for dt, mk in (("float32", "o-"), ("bfloat16", "s--")):
            rs = sorted((r for r in rows if r["dtype"] == dt), key=lambda r: r["params_M"])
            if rs:
                ax.plot([r["params_M"] * 1e6 for r in rs], [r[key] for r in rs], mk, label=dt)
        ax.axhline(goal, color="k", lw=1, ls=":", label=f"goal ≤ {goal}")
        ax.set(
            xscale="log",
            xlabel="parameters as built (W_E, W_U untied)",
            ylabel=ylab,
            title=ylab,
        )
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([1.5e8, 3e8, 6e8, 1.2e9, 2.4e9], ["150M", "300M", "600M", "1.2B", "2.4B"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        "steerlin's cost vs model size: random-weight models of real shapes, CPU", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def md(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("–" if v is None else (fmt.format(v) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def report(quick: bool = False) -> dict:
    runs = load_runs(quick)
    if not runs:
        print("no scale_*.json results yet")
        return {}
    rows = [size_row(r) for r in runs if r["threads"] == 1]
    rows.sort(key=lambda r: (r["threads"], r["dtype"] != "float32", r["params_M"]))
    models = cost_models(rows)
    workload = runs[0]["workload"]
    ext = llama8b(rows, models, workload)
    tick = {True: "met", False: "MISSED"}
    for r in rows:
        r["v_time"], r["v_rss"] = tick[r["verdict_fit_time"]], tick[r["verdict_fit_rss"]]
        r["v_gen"] = tick[r["verdict_gen"]]
    one = [r for r in rows if r["threads"] == 1]
    print(f"workload: {workload}\n")
    print(
        md(
            one,
            [
                ("shape", "shape", ""),
                ("dtype", "dtype", ""),
                ("params_M", "params (M)", "{:.0f}"),
                ("weights_GiB", "weights GiB", "{:.2f}"),
                ("directions_cpu_s", "directions s", "{:.1f}"),
                ("exact_cpu_s", "exact s", "{:.1f}"),
                ("fit_cpu_s", "fit d=8 s", "{:.1f}"),
                ("scan_cpu_s", "scan s", "{:.1f}"),
                ("calibrate_cpu_s", "calibrate s", "{:.1f}"),
                ("gen_plain_s", "gen plain s (wall)", "{:.1f}"),
                ("gen_steered_s", "gen apply s (wall)", "{:.1f}"),
                ("load", "load", "{:.1f}"),
            ],
        )
    )
    print()
    print(
        md(
            one,
            [
                ("shape", "shape", ""),
                ("dtype", "dtype", ""),
                ("exact_tokfwd", "exact tok-fwd", "{:,.0f}"),
                ("fit_tokfwd", "fit tok-fwd", "{:,.0f}"),
                ("scan_tokfwd", "scan tok-fwd", "{:,.0f}"),
                ("calibrate_tokfwd", "calib tok-fwd", "{:,.0f}"),
                ("computed_tokfwd", "computed tok-fwd", "{:,.0f}"),
                ("searched_tokfwd", "searched tok-fwd", "{:,.0f}"),
                ("searched_over_computed", "searched / computed", "{:.0f}x"),
                ("computed_wall_s", "computed s (wall)", "{:.0f}"),
                ("searched_s_est", "searched s (est.)", "{:,.0f}"),
            ],
        )
    )
    print()
    print(
        md(
            one,
            [
                ("shape", "shape", ""),
                ("dtype", "dtype", ""),
                ("fit_over_exact_cpu", "fit / exact (CPU)", "{:.2f}x"),
                ("fit_over_exact_wall", "(wall)", "{:.2f}x"),
                ("v_time", "≤ 1.5x", ""),
                ("fit_rss_GiB", "fit peak RSS GiB", "{:.2f}"),
                ("fit_rss_over_weights_GiB", "− weights GiB", "{:+.2f}"),
                ("v_rss", "≤ +1.5 GiB", ""),
                ("fit_rss_over_model_GiB", "− model alone GiB", "{:+.2f}"),
                ("gen_overhead_cpu", "apply overhead (CPU)", "{:+.1%}"),
                ("gen_overhead_wall", "(wall)", "{:+.1%}"),
                ("gen_overhead_best_cpu", "best vs best (CPU)", "{:+.1%}"),
                ("v_gen", "≤ 5%", ""),
            ],
        )
    )
    pairs = threads_pairs(runs)
    if pairs:
        print()
        cols = [("shape", "shape (float32)", "")]
        cols += [(k, f"{k}: 1 → 2 threads, wall (CPU)", "") for k in STAGES[:4]]
        print(md(pairs, cols))
    print("\ncost model: CPU s = k (compute params x token-forwards)^b")
    for key, m in models.items():
        if "two_term" in key:
            print(
                f"  {key}: alpha={m['alpha']:.3g} beta={m['beta']:.3g} residual factors "
                f"{[round(f, 2) for f in m['residual_factors']]} eig share "
                f"{[round(f, 2) for f in m['eig_share']]}"
            )
            continue
        print(
            f"  {key}: k={m['k']:.3g} b={m['b']:.3f} rms log residual {m['rms_log_residual']:.3f} "
            f"residual factors {[round(f, 2) for f in m['residual_factors']]}"
        )
    print("\nLlama-3.1-8B:", json.dumps(ext, indent=1))
    path = plot(rows, models)
    print(f"\nplot: {path}")
    summary = {
        "workload": workload,
        "rows": rows,
        "threads": pairs,
        "cost_models": models,
        "llama_3_1_8b": ext,
    }
    out = C.RESULTS / f"scale_summary{'_quick' if quick else ''}.json"
    from steerlin.report import jsonable

    out.write_text(json.dumps(jsonable(summary), indent=1) + "\n")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    report(quick="--quick" in sys.argv)
