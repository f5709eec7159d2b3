"""bench_engine.py's tables and its summary against the goals."""

from __future__ import annotations

import os

import _common as C


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
