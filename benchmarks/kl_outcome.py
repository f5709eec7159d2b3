"""The outcome on text at a KL budget: which objective moves the judged text most at 0.1 nats/token.

    python benchmarks/kl_outcome.py --threads 1 [--quick]

Gemma-3-270m, SST-2 directions on the concept split (200 per class), the surrogate on the
operating split (50 per class, d = 8), as benchmarks/kl_budget.py. Every schedule is sized or
calibrated on the 12 calibration stems (`neutral_stems()["calibration"]`, their unsteered
8-token greedy continuations, the regime of use: the last prompt token and every generated
token) and judged on all held-out stems (`neutral_stems()["eval"] + ["extra"]`: 144 in the
committed run, `--stems 144` since the file grew to 180), greedy 24 tokens, at + and − signs.
Rows:

- min-norm at t = 1 and t = 2 class separations (readout calibration by bisection, as today);
- min-norm at the KL budget (`Controller(sur, kl=0.1)`, the first-order Fisher sizing);
- the in-regime objective (`Controller.in_regime`: α ∝ (F̄ + λI)⁻¹g, max g·α at ½αᵀF̄α = kl)
  for the in-regime gains (`steerlin.inregime.regime_gains` on the calibration stems) of the
  lexicon readout (VADER's own word valences: judging it with VADER scores the readout by
  itself, hence TextBlob as the second, independent judge), the label words' logit difference
  (" positive" − " negative") and the concept projection; and the single best in-regime layer
  (largest |g_l|/√F̄_ll, lexicon);
- what `Controller.recommend(kl=0.1)` picks (`steerlin.objective.choose` applied to these
  rows).

Columns: VADER Δ(+,−) (mean over stems of judge(+) − judge(−)) with its sd over 12 groups of
12 stems and a bootstrap 95% CI over stems; TextBlob Δ(+,−); perplexity ratio +/− under the
unsteered model (corpus perplexity of the 24-token continuations over the unsteered one's);
the measured per-token KL on the held-out stems along their unsteered continuations (the
budget's own definition: 8 tokens, teacher-forced; mean and p95, mean of the two signs) beside
the budget and the prediction on the calibration stems. Goal (issue 35): VADER Δ(+,−) ≥ 0.6 at
perplexity ≤ 1.5× at KL 0.1 on held-out stems. Also the ridge's effect on the predicted
objective (no judged text is looked at to set it).

Writes benchmarks/results/kl_outcome.json (kl_outcome_quick.json with --quick) and
docs/img/kl_outcome.png (Δ vs measured KL per row); resumable (--resume reuses finished rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import steerlin  # noqa: E402
from steerlin.budget import STATS, RegimeFisher, kl_stat  # noqa: E402
from steerlin.inregime import RegimeGains, regime_gains  # noqa: E402
from steerlin.judges import get_judge  # noqa: E402
from steerlin.measure import continuation_scores, final_states, measured_token_kl  # noqa: E402
from steerlin.objective import choose  # noqa: E402
from steerlin.regime import Continuations, generate  # noqa: E402
from steerlin.steer_eval import SETTINGS, neutral_stems  # noqa: E402

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
READOUTS = ("lexicon", "label_words", "concept")
GOAL_DELTA, GOAL_PPL, GOAL_KL = 0.6, 1.5, 0.1


def gen(model, prompts, n, sched, chunk):
    """Greedy continuations in chunks of `chunk` prompts (one batch of 144 would hold the
    prompt logits of all at once), as one Continuations."""
    parts = [
        generate(model, prompts[s : s + chunk], n, sched) for s in range(0, len(prompts), chunk)
    ]
    return Continuations(
        list(prompts),
        [p for c in parts for p in c.prompt_ids],
        torch.cat([c.new_ids for c in parts]),
        [t for c in parts for t in c.texts],
    )


def gains_of(model, cal, dirs, T, cache: Path) -> RegimeGains:
    """In-regime gains (and the regime Fisher) on the calibration stems; cached for resuming."""
    if cache.is_file():
        d = torch.load(cache)
        return RegimeGains(
            d["gains"], d["per_token"], d["values"], RegimeFisher(**d["fisher"]), d["meta"]
        )
    rg = regime_gains(
        model,
        cal,
        dirs,
        readouts=("concept", "label_words", "lexicon"),
        label_words=SETTINGS["sst2"].label_words,
        lexicon="vader",
        n_tokens=T,
    )
    d = {f.name: getattr(rg, f.name) for f in dataclasses.fields(rg)}
    d["fisher"] = dataclasses.asdict(rg.fisher)
    torch.save(d, cache)
    return rg


def schedules(model, sur, dirs, cal, rg, T, budgets) -> dict:
    """row name -> a function giving {"+": Schedule, "-": Schedule, "objective", "budget"}
    (sized or calibrated when called), the rows in the order they are measured: the default
    and the main objective first (a run cut short still answers the question)."""
    Ctl = steerlin.Controller
    pm = ((1, "+"), (-1, "-"))
    kl0 = budgets[0]

    def sep(t):
        return lambda: dict(
            {k: Ctl(sur, s * t).calibrate(model, cal, n_tokens=T).calibrated for s, k in pm},
            objective="min-norm",
            budget=None,
        )

    def minnorm(kl):
        return lambda: dict(
            {
                k: Ctl(sur, float(s), kl=kl)
                .calibrate(model, cal, n_tokens=T, fisher=rg.fisher)
                .calibrated
                for s, k in pm
            },
            objective="min-norm",
            budget=kl,
        )

    def inreg(rd, kl, single=False):
        def make():
            kw = dict(model=model, prompts=cal, readout=rd, kl=kl, single_layer=single)
            pair = {k: Ctl.in_regime(dirs, rg, sign=s, **kw).calibrated for s, k in pm}
            layer = f":layer {pair['+'].layers[0]}" if single else ""
            return dict(pair, objective=f"in-regime:{rd}{layer}", budget=kl)

        return make

    from steerlin.objective import best_layer

    top = best_layer(rg.gains["lexicon"].to(F64), rg.fisher, list(range(model.cfg.n_layers)))
    out = {
        f"min-norm KL {kl0:g}": minnorm(kl0),
        f"in-regime lexicon KL {kl0:g}": inreg("lexicon", kl0),
        "min-norm t = 1": sep(1.0),
        f"in-regime label_words KL {kl0:g}": inreg("label_words", kl0),
        f"in-regime lexicon, layer {top} alone, KL {kl0:g}": inreg("lexicon", kl0, True),
        "min-norm t = 2": sep(2.0),
        f"in-regime concept KL {kl0:g}": inreg("concept", kl0),
    }
    for kl in budgets[1:]:
        out[f"min-norm KL {kl:g}"] = minnorm(kl)
        out[f"in-regime lexicon KL {kl:g}"] = inreg("lexicon", kl)
    return out


def ridge_effect(model, dirs, cal, rg, kl) -> dict:
    """Predicted objective g·α at the budget and cos(α, α at the default ridge) per ridge, per
    readout (first order on the calibration stems; no text generated or judged)."""
    out = {}
    for rd in READOUTS:
        g = rg.gains[rd].to(F64)
        ref, rows = None, []
        for ridge in (1e-2, 0.0, 1e-3, 1e-1, 1.0):
            a = steerlin.Controller.in_regime(
                dirs, rg, model=model, prompts=cal, readout=rd, kl=kl, ridge=ridge
            ).calibrated.amplitudes.to(F64)
            ref = a if ref is None else ref
            rows.append(
                {
                    "ridge": ridge,
                    "predicted_gain": float(g @ a),
                    "cos_to_default": float(a @ ref / (a.norm() * ref.norm())),
                    "p95_kl_predicted": rg.fisher.predict(a, "p95"),
                }
            )
        best = max(r["predicted_gain"] for r in rows)
        for r in rows:
            r["of_best"] = r["predicted_gain"] / best
        out[rd] = rows
    return out


def per_stem_nll(model, cont) -> np.ndarray:
    return continuation_scores(model, cont)["nll"].numpy()


def measure(model, held, sched, base, clean, T, chunk, judges) -> dict:
    """One signed schedule on the held-out stems: texts, judges, NLL, measured KL."""
    cont = gen(model, held, base["tokens"], sched, chunk)
    tk = measured_token_kl(model, base["cont"], sched.vectors, n_new=T, clean=clean)
    return {
        "texts": cont.texts,
        "judge": {k: j(cont.texts).tolist() for k, j in judges.items()},
        "nll": per_stem_nll(model, cont).tolist(),
        "kl": {s: kl_stat(tk, s) for s in STATS},
    }


def summarise(name, spec, m, base, rg, boot, seed=0) -> dict:
    """A row's figures from its two signed measurements."""
    row = {"row": name, "objective": spec["objective"], "budget": spec["budget"]}
    rng = np.random.default_rng(seed)
    n = len(base["nll"])
    groups = np.arange(n) // 12
    for jn in m["+"]["judge"]:
        d = np.asarray(m["+"]["judge"][jn]) - np.asarray(m["-"]["judge"][jn])
        gm = [d[groups == k].mean() for k in range(groups.max() + 1)]
        bs = d[rng.integers(0, n, (boot, n))].mean(1)
        row[jn] = {
            "delta": float(d.mean()),
            "sd_groups": float(np.std(gm, ddof=1)) if len(gm) > 1 else math.nan,
            "ci95": [float(np.quantile(bs, 0.025)), float(np.quantile(bs, 0.975))],
            "plus": float(np.mean(m["+"]["judge"][jn])),
            "minus": float(np.mean(m["-"]["judge"][jn])),
            "unsteered": float(np.mean(base["judge"][jn])),
        }
    ppl0 = math.exp(float(np.mean(base["nll"])))
    row["ppl_ratio"] = {k: math.exp(float(np.mean(m[k]["nll"]))) / ppl0 for k in ("+", "-")}
    row["measured_kl"] = {s: float(np.mean([m[k]["kl"][s] for k in "+-"])) for s in STATS}
    row["measured_kl_by_sign"] = {k: m[k]["kl"] for k in "+-"}
    a = spec["+"].amplitudes.to(F64)
    row["predicted_kl_calibration"] = {s: rg.fisher.predict(a, s) for s in STATS}
    row["predicted_gain"] = {rd: float(rg.gains[rd].to(F64) @ a) for rd in READOUTS}
    row["amplitudes_plus"] = a.tolist()
    row["amplitudes_minus"] = spec["-"].amplitudes.to(F64).tolist()
    row["layers"] = spec["+"].layers
    row["meets_goal"] = bool(
        row["vader"]["delta"] >= GOAL_DELTA and max(row["ppl_ratio"].values()) <= GOAL_PPL
    )
    return row


def table(rows) -> str:
    lines = [
        "| row | budget | VADER Δ(+,−) ± sd (12×12) [95% CI] | TextBlob Δ(+,−) [95% CI] "
        "| ppl ratio + / − | measured KL mean / p95 (held-out) | predicted mean / p95 (cal.) "
        "| VADER / TextBlob Δ − default's, paired [95% CI] | goal (at KL 0.1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        goal = "—" if r["budget"] != GOAL_KL else "meets" if r["meets_goal"] else "misses"
        pd = r.get("vs_default")
        pair = (
            "—"
            if pd is None
            else f"{pd['vader']['diff']:+.3f} [{pd['vader']['ci95'][0]:+.2f}, "
            f"{pd['vader']['ci95'][1]:+.2f}] / {pd['textblob']['diff']:+.3f} "
            f"[{pd['textblob']['ci95'][0]:+.2f}, {pd['textblob']['ci95'][1]:+.2f}]"
        )
        v, t = r["vader"], r["textblob"]
        b = "—" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(
            f"| {r['row']} | {b} | {v['delta']:+.3f} ± {v['sd_groups']:.3f} "
            f"[{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}] | {t['delta']:+.3f} "
            f"[{t['ci95'][0]:+.2f}, {t['ci95'][1]:+.2f}] "
            f"| {r['ppl_ratio']['+']:.2f} / {r['ppl_ratio']['-']:.2f} "
            f"| {r['measured_kl']['mean']:.3f} / {r['measured_kl']['p95']:.3f} "
            f"| {r['predicted_kl_calibration']['mean']:.3f} / "
            f"{r['predicted_kl_calibration']['p95']:.3f} | {pair} "
            f"| {goal} |"
        )
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6.5))
    for i, r in enumerate(rows):
        x = r["measured_kl"]["mean"]
        for jn, mk, dx in (("vader", "o", 0.0), ("textblob", "s", 0.004)):
            j = r[jn]
            err = [[j["delta"] - j["ci95"][0]], [j["ci95"][1] - j["delta"]]]
            ax.errorbar(
                x + dx,
                j["delta"],
                yerr=err,
                fmt=mk,
                color=f"C{i % 10}",
                capsize=3,
                mfc="white" if jn == "textblob" else None,
                label=r["row"] if jn == "vader" else None,
            )
    ax.axhline(GOAL_DELTA, color="grey", ls="--", lw=1)
    ax.text(
        0.01,
        GOAL_DELTA + 0.01,
        "goal: VADER Δ ≥ 0.6",
        color="grey",
        fontsize=8,
        transform=ax.get_yaxis_transform(),
    )
    ax.axvline(0.1, color="grey", ls=":", lw=1)
    ax.set_xlabel("measured mean per-token KL on the held-out stems (nats)")
    ax.set_ylabel("judged Δ(+,−): VADER (filled), TextBlob (open); 95% CI")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(bottom=0.27, top=0.94)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired(res: dict, default: str, boot: int = 2000, seed: int = 0) -> None:
    """Each row's per-stem Δ(+,−) minus the default row's on the same stems (both judges,
    re-judged from the saved texts), with a bootstrap 95% CI over stems, into row["vs_default"]."""
    judges = {"vader": get_judge("vader"), "textblob": get_judge("textblob")}
    smp = res["samples"]
    per = {
        name: {
            jn: np.asarray(j(smp[name]["+"])) - np.asarray(j(smp[name]["-"]))
            for jn, j in judges.items()
        }
        for name in [r["row"] for r in res["rows"]]
        if name in smp
    }
    if default not in per:
        return
    rng = np.random.default_rng(seed)
    n = len(smp["prompt"])
    idx = rng.integers(0, n, (boot, n))
    for r in res["rows"]:
        if r["row"] not in per or r["row"] == default:
            r.pop("vs_default", None)
            continue
        r["vs_default"] = {"default": default}
        for jn in judges:
            d = per[r["row"]][jn] - per[default][jn]
            bs = d[idx].mean(1)
            ci = [float(np.quantile(bs, 0.025)), float(np.quantile(bs, 0.975))]
            r["vs_default"][jn] = {"diff": float(d.mean()), "ci95": ci}


def report(out: Path, png: Path, log) -> None:
    """--report: paired differences, the recommend pick, table, verdict and figure, from the
    saved result (no model run)."""
    res = json.loads(out.read_text())
    kl0 = float(res["args"]["budgets"].split(",")[0])
    head = {k: v for k, v in res.items() if k not in ("rows", "samples", "table", "verdict")}
    finish(head, res["rows"], res["samples"], out, png, kl0, res["wall_s"], res["partial"], log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--budgets",
        default="0.1",
        help="KL budgets (all rows at the first; lexicon and min-norm at the others)",
    )
    ap.add_argument("--stems", type=int, default=None, help="held-out stems (default all)")
    ap.add_argument("--tokens", type=int, default=24, help="generated tokens judged")
    ap.add_argument("--cal-stems", type=int, default=12, help="calibration stems")
    ap.add_argument("--cal-tokens", type=int, default=8, help="calibration continuation tokens")
    ap.add_argument("--sizes", default="200,50", help="concept,operating prompts per class")
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=36, help="stems per generation batch")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--data-dir", default=str(C.DEFAULT_DATA))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--resume", action="store_true", help="reuse finished rows of a partial run")
    ap.add_argument("--report", action="store_true", help="tables and figure from the result")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.d, args.tokens, args.stems, args.budgets = "32,16", 4, 6, 12, "0.1"
        args.cal_stems, args.cal_tokens = 4, 4
    torch.set_num_threads(args.threads)
    t0 = time.time()
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')} +{time.time() - t0:.0f}s] {m}", flush=True)
    env = C.environment(args)
    tag = "_quick" if args.quick else ""
    out = C.RESULTS / f"kl_outcome{tag}.json"
    png = ROOT / "docs" / "img" / f"kl_outcome{tag}.png"
    if args.report:
        return report(out, png, log)
    budgets = [float(x) for x in args.budgets.split(",")]
    T = args.cal_tokens
    model, _, dirs, sur = C.sst2_setup(args.data_dir, args.sizes, args.d)
    timings = {"directions_and_surrogate": time.time() - t0}
    log("directions and surrogate")
    stems = neutral_stems()
    held = (stems["eval"] + stems["extra"])[: args.stems]
    cal = generate(model, stems["calibration"][: args.cal_stems], T)
    t = time.time()
    cache = Path("/tmp") / f"kl_outcome_gains_{args.sizes}_{args.d}_{T}_{args.cal_stems}.pt"
    rg = gains_of(model, cal, dirs, T, cache)
    timings["regime_gains"] = time.time() - t
    log(f"in-regime gains and Fisher ({timings['regime_gains']:.0f} s)")
    specs = schedules(model, sur, dirs, cal, rg, T, budgets)
    ridge = ridge_effect(model, dirs, cal, rg, budgets[0])
    for rd, rows_ in ridge.items():
        log(
            f"  ridge effect ({rd}): "
            + ", ".join(
                f"{r['ridge']:g}: {r['of_best']:.3f} (cos {r['cos_to_default']:.3f})" for r in rows_
            )
        )
    judges = {"vader": get_judge("vader"), "textblob": get_judge("textblob")}
    t = time.time()
    base_cont = gen(model, held, args.tokens, None, args.chunk)
    base = {
        "cont": base_cont,
        "tokens": args.tokens,
        "judge": {k: j(base_cont.texts).tolist() for k, j in judges.items()},
        "nll": per_stem_nll(model, base_cont).tolist(),
    }
    clean = final_states(model, base_cont, None, n_new=T)
    timings["unsteered"] = time.time() - t
    log(
        f"unsteered on {len(held)} stems: VADER {np.mean(base['judge']['vader']):+.3f}, "
        f"TextBlob {np.mean(base['judge']['textblob']):+.3f}, ppl "
        f"{math.exp(np.mean(base['nll'])):.3f} ({timings['unsteered']:.0f} s)"
    )
    head = {
        "benchmark": "kl_outcome",
        **env,
        "args": vars(args),
        "model": "gemma-3-270m",
        "task": "sst2",
        "n_calibration": len(cal),
        "n_heldout": len(held),
        "heldout": "neutral_stems()['eval'] + ['extra']",
        "unsteered": {
            "vader": float(np.mean(base["judge"]["vader"])),
            "textblob": float(np.mean(base["judge"]["textblob"])),
            "ppl": math.exp(float(np.mean(base["nll"]))),
        },
        "in_regime_gains": {rd: rg.gains[rd].tolist() for rd in READOUTS},
        "fisher_mean_diag": rg.fisher.mean.diagonal().tolist(),
        "ridge_effect": ridge,
        "timings_s": timings,
        "goal": f"VADER Δ(+,−) ≥ {GOAL_DELTA} at perplexity ≤ {GOAL_PPL}x at KL 0.1, held-out",
    }
    done, samples = {}, {"prompt": held, "unsteered": base_cont.texts}
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        same = ("sizes", "d", "tokens", "cal_stems", "cal_tokens", "data_dir", "quick")
        ok = all(old.get("args", {}).get(k) == getattr(args, k) for k in same)
        if ok and old.get("samples", {}).get("prompt") == held:  # the same held-out stems
            done = {r["row"]: r for r in old.get("rows", [])}
            head["rows_reused_from"] = old.get("command")
            samples = old.get("samples", samples)
    rows = []
    for name, make in specs.items():
        t = time.time()
        if name in done:
            rows.append(done[name])
            log(f"{name}: reused")
            continue
        spec = make()
        m = {k: measure(model, held, spec[k], base, clean, T, args.chunk, judges) for k in "+-"}
        row = summarise(name, spec, m, base, rg, args.boot)
        row["wall_s"] = time.time() - t
        rows.append(row)
        samples[name] = {k: m[k]["texts"] for k in "+-"}
        log(
            f"{name}: VADER {row['vader']['delta']:+.3f} ± {row['vader']['sd_groups']:.3f}, "
            f"TextBlob {row['textblob']['delta']:+.3f}, ppl {row['ppl_ratio']['+']:.2f}/"
            f"{row['ppl_ratio']['-']:.2f}, KL {row['measured_kl']['mean']:.3f} "
            f"({row['wall_s']:.0f} s)"
        )
        done_all = len(rows) == len(specs)
        finish(head, rows, samples, out, png, budgets[0], time.time() - t0, not done_all, log)
    log(f"done in {time.time() - t0:.0f} s")


def finish(head, rows, samples, out, png, kl0, wall, partial, log) -> None:
    """The result file, table, verdict and figure from the rows so far."""
    paired({"rows": rows, "samples": samples}, f"min-norm KL {kl0:g}", head["args"]["boot"])
    pick = choose(rows, kl0)
    at = [r for r in rows if r["budget"] == kl0]
    res = dict(head, wall_s=wall, partial=partial, rows=rows, recommend_pick=pick)
    res["rows_missing"] = partial
    if at:
        best = max(at, key=lambda r: r["vader"]["delta"])
        default = next((r for r in at if r["objective"] == "min-norm"), best)
        word = lambda r: "meets" if r["meets_goal"] else "misses"
        res["verdict"] = (
            f"At KL {kl0:g} on {head['n_heldout']} held-out stems: the default (min-norm, "
            f"Controller(kl={kl0:g})) VADER Δ {default['vader']['delta']:+.3f} at ppl "
            f"{max(default['ppl_ratio'].values()):.2f}x ({word(default)} the goal); the best "
            f"row, {best['row']}, {best['vader']['delta']:+.3f} [{best['vader']['ci95'][0]:+.2f},"
            f" {best['vader']['ci95'][1]:+.2f}] at ppl {max(best['ppl_ratio'].values()):.2f}x, "
            f"TextBlob {best['textblob']['delta']:+.3f} ({word(best)} the goal of Δ ≥ "
            f"{GOAL_DELTA} at ≤ {GOAL_PPL}x); recommend(kl={kl0:g}) picks {pick['row']}."
        )
    res["table"] = table(rows)
    res["samples"] = samples
    out.write_text(json.dumps(res, indent=1))
    log(res["table"])
    log(res.get("verdict", ""))
    title = f"Gemma-3-270m, SST-2: judged Δ(+,−) on {head['n_heldout']} held-out stems vs KL"
    plot(rows, png, title + (" (partial)" if partial else ""))
    log(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
