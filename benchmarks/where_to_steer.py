"""Where to steer: per-layer judged effect at matched KL vs the predictors (issue 27).

    python benchmarks/where_to_steer.py                  # Gemma-3-270m, SST-2, KL 0.1 and 0.3
    python benchmarks/where_to_steer.py --task hate --seeds 1 --quick
    python benchmarks/where_to_steer.py --kl 0.1 --tokens 20 --stems all \
        --amplitudes-from benchmarks/results/where_to_steer_sst2_3seeds.json --tag _144stems

Ground truth (`steerlin.ground_truth.layer_effects`): for each layer l alone, the concept direction
unit_l is injected (last prompt token and every generated token, as `apply` steers generation) with
the amplitude at which the measured next-token KL along the unsteered 8-token continuations of the
12 calibration stems equals each `--kl` level (bisection on the full model); greedy continuations of
the held-out stems at +a and -a are judged (VADER for sst2, alt-profanity-check for hate); the
per-layer effect is the judged Δ(+,−). `--stems all` judges the 180 held-out stems (evaluation +
extra) and keeps every stem's score; `--amplitudes-from` reuses a saved sweep's amplitudes (defined
on the calibration stems alone) instead of bisecting. Where per-stem scores exist, the split-half
reliability of the judged curve (`ground_truth.split_half_reliability`) and its ceiling √reliability
stand beside every predictor's ρ, with ρ / ceiling. Predictors (steerlin.predictors, no generation):
exact gains |h_l|, the surrogate's gains, gain per unit KL h_l²/F_ll (of the concept readout, and of
the logit readout: the label words' logit difference, what the next token leans to), the logit lens
accuracy A_lin (LAP) and a held-out linear probe's accuracy on x_l. Each is scored by Spearman
across layers with the judged effect and by the judged effect at its top layer over the best
layer's.
Writes benchmarks/results/where_to_steer_<task>[_<model>][<tag>].json and docs/img/ likewise
(.png). `--rescore` keeps a result file's judged sweep and recomputes the predictors and scores
(minutes instead of the sweep's half hour). `--reliability` (alone) computes the split-half
reliability of the judged curves from the saved sweeps (no model run): from the per-stem scores
of a `_144stems` sweep where one exists, else from the 1-seed and 3-seed sweeps (12 vs 24).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common as C
import numpy as np
import torch

import steerlin
from steerlin import ground_truth as gt
from steerlin import predictors as pr
from steerlin.ground_truth import layer_effects
from steerlin.steer_eval import SETTINGS, TASKS, neutral_stems

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def plot(res: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.4))
    levels = list(res["judged"])
    L = len(res["judged"][levels[0]]["delta"])
    x = np.arange(L)
    w = 0.8 / len(levels)
    for i, k in enumerate(levels):
        ax.bar(
            x + (i - (len(levels) - 1) / 2) * w,
            res["judged"][k]["delta"],
            w,
            alpha=0.5,
            label=f"judged Δ(+,−), KL {k}",
        )
    ax2 = ax.twinx()
    for i, (name, v) in enumerate(res["predictors"].items()):  # tab20: no colour repeats
        v = np.array(v, dtype=float)
        c = plt.cm.tab20(2 * i % 20 + (2 * i // 20) % 2)
        ax2.plot(x, v / np.nanmax(np.abs(v)), marker="o", ms=3, label=name, color=c)
    ax.set_xticks(x)
    ax.set_xlabel("injection layer l (x_l)")
    ax.set_ylabel("judged Δ(+,−)")
    ax2.set_ylabel("predictor / its max")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="lower right", fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def predictors(model, task: str, nc: int, no: int, d: int, data_dir: str, log) -> tuple:
    """The directions (concept split) and every predictor (operating split), no generation."""
    tk = steerlin.load_task(TASKS[task], data_dir=data_dir)
    sp = tk.split(nc, no, 0, seed=0)
    t0 = time.time()
    dirs = steerlin.ConceptDirections.fit(
        model, sp.concept.texts, sp.concept.labels, label_names=tk.spec.class_names
    )
    ops = list(sp.operating.texts)
    words = SETTINGS[task].label_words
    timings = {}
    t = time.time()
    sur = steerlin.Surrogate.fit(model, ops, dirs, d=d)
    timings["surrogate"] = time.time() - t
    h = sur.gains_exact  # exact gains on the same prompts: the fit's observability pass
    t = time.time()
    F = steerlin.kl_metric(model, neutral_stems()["calibration"], dirs)
    timings["kl_metric"] = time.time() - t
    # the logit readout: the label words' logit difference at x_L (what the next token is)
    t = time.time()
    h_logit = steerlin.exact_gains(model, ops, dirs, readout="logits", label_words=words)
    timings["exact_gains_logits"] = time.time() - t
    # A_lin and the probe on the operating split (held out from the directions' concept split)
    lab = list(sp.operating.labels)
    t = time.time()
    alin = pr.logit_lens_accuracy(model, ops, lab, label_words=words)
    timings["logit_lens"] = time.time() - t
    t = time.time()
    probe = pr.probe_accuracy(model, ops, lab)
    timings["probe"] = time.time() - t
    # in-regime readouts (steerlin.inregime): unit injections at the last prompt token and every
    # generated position along the calibration stems' unsteered 20-token continuations
    # (teacher-forced, attention not frozen); abs(g_l) / sqrt(F_ll) ("|" would split a markdown
    # table cell), one forward-mode pass
    t = time.time()
    learnt = steerlin.Lexicon.learnt(model, list(sp.concept.texts), list(sp.concept.labels))
    judge_lex = {"sst2": "vader", "hate": "profanity"}[task]
    lexs = [steerlin.lexicon.get_lexicon(model, judge_lex), learnt]
    cal = neutral_stems()["calibration"]
    rg = steerlin.regime_gains(model, cal, dirs, label_words=words, lexicon=lexs, n_tokens=20)
    timings["in_regime"] = time.time() - t
    t = time.time()
    nav = pr.layer_navigator(model, list(sp.concept.texts), list(sp.concept.labels), dirs)
    timings["layer_navigator"] = time.time() - t
    preds = {
        "exact gain": pr.gain_curve(h),
        "surrogate gain": pr.gain_curve(sur.gains),
        "gain² per KL, h²/F_ll": pr.gain_per_kl(h, F),
        "logit-readout gain² per KL": pr.gain_per_kl(h_logit, F),
        "A_lin (logit lens)": alin,
        "probe accuracy": probe,
        "in-regime concept abs(g)/√F": rg.per_kl("concept"),
        "in-regime label words abs(g)/√F": rg.per_kl("label_words"),
        f"in-regime lexicon ({judge_lex}) abs(g)/√F": rg.per_kl(f"lexicon:{judge_lex}"),
        "in-regime lexicon (learnt) abs(g)/√F": rg.per_kl("lexicon:learnt"),
        "LayerNavigator d+c": nav.s,
    }
    log(f"{task}: predictors in {time.time() - t0:.0f} s")
    return dirs, preds, timings


def curve_reliability(judged: dict) -> dict:
    """{level: `ground_truth.split_half_reliability` of its per-stem judged Δ, or None where
    the sweep kept no per-stem scores (before --stems all)}."""
    return {
        k: gt.split_half_reliability(gt.stem_deltas(rec)) if "plus_stems" in rec else None
        for k, rec in judged.items()
    }


def score_and_write(res: dict, out: Path, img: Path, title: str, log) -> None:
    """Scores of every predictor at every KL level, the markdown table, the JSON, the figure."""
    preds = {n: torch.tensor(v, dtype=F64) for n, v in res["predictors"].items()}
    scores = {}
    for k, rec in res["judged"].items():
        # layers where the direction is zero (nothing to inject) are left out of the scores
        d = torch.tensor(rec["delta"], dtype=F64)
        ok = torch.nonzero(~torch.isnan(d)).flatten()
        sc = pr.score_predictors({n: p[ok] for n, p in preds.items()}, d[ok])
        for v in sc.values():
            v["top_layer"] = int(ok[v["top_layer"]])
        scores[k] = sc
    res["scores"] = scores
    res["reliability"] = rel = curve_reliability(res["judged"])
    lines = [
        f"KL {k}: split-half reliability of the judged curve {r['reliability']:.2f} "
        f"[{r['reliability_q05']:.2f}, {r['reliability_q95']:.2f}] over {r['n_stems']} stems "
        f"({r['n_splits']} random halves, Spearman-Brown), ceiling √rel {r['ceiling']:.2f}"
        if r
        else f"KL {k}: no per-stem scores (run with --stems all): no reliability, no ceiling"
        for k, r in rel.items()
    ]
    lines += [
        "",
        "| predictor | "
        + " | ".join(
            f"Spearman (KL {k}) | ρ / ceiling (KL {k}) | top layer: effect / best (KL {k})"
            for k in scores
        )
        + " |",
        "|---|" + "---|---|---|" * len(scores),
    ]
    for n in preds:
        cells = []
        for k in scores:
            s = scores[k][n]
            c = rel[k]["ceiling"] if rel[k] else 0.0
            s["fraction_of_ceiling"] = s["spearman"] / c if c > 0 else None
            frac = f"{s['fraction_of_ceiling']:+.2f}" if c > 0 else "–"
            cells += [f"{s['spearman']:+.2f}", frac, f"l={s['top_layer']}: {s['top_fraction']:.2f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    res["table"] = "\n".join(lines)
    log(res["table"])
    out.write_text(json.dumps(res, indent=1))
    img.parent.mkdir(parents=True, exist_ok=True)
    plot(res, img, title)
    log(f"wrote {out} and {img}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2", choices=sorted(TASKS))
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--sizes", default="200,50", help="concept,operating prompts per class")
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--kl", default="0.1,0.3", help="KL levels (nats/token)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds of 12 held-out stems")
    ap.add_argument(
        "--stems",
        default="seeds",
        choices=("seeds", "all"),
        help="held-out stems judged: the first --seeds × 12 evaluation stems, or all "
        "(evaluation + extra, 180: per-stem scores for the split-half reliability)",
    )
    ap.add_argument(
        "--amplitudes-from",
        default="",
        help="a result file (same task and model) whose matched-KL amplitudes are reused "
        "(they are defined on the calibration stems only): no bisection",
    )
    ap.add_argument(
        "--predictors-from",
        default="",
        help="a result file (same task, model, sizes, d) whose predictor rows are reused (they "
        "do not depend on the judged stems): only the directions are fitted here",
    )
    ap.add_argument(
        "--extend",
        action="store_true",
        help="judge the held-out stems that the existing result file (same --task/--model/"
        "--tag) lacks, at its amplitudes, and merge them into it",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the existing partial result file (same --task/--model/--tag, same "
        "stems) after its last finished layer",
    )
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--data-dir", default=str(C.DEFAULT_DATA))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tag", default="", help="suffix for the result and figure names")
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="keep the judged sweep of the existing result file (same --task/--model/--tag) "
        "and recompute the predictors (e.g. after adding one) and the scores",
    )
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.kl, args.tokens = "32,16", "0.3", 12
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)
    suffix = (
        ("" if args.model == "gemma-3-270m" else f"_{args.model}")
        + ("_quick" if args.quick else "")
        + args.tag
    )
    out = ROOT / "benchmarks" / "results" / f"where_to_steer_{args.task}{suffix}.json"
    img = ROOT / "docs" / "img" / f"where_to_steer_{args.task}{suffix}.png"
    title = f"{args.model}, {args.task}: judged effect per layer at matched KL vs predictors"
    old = json.loads(out.read_text()) if args.rescore else None
    if old is not None:  # the sweep's own settings, whatever the command line says
        for k in ("sizes", "d", "seeds", "tokens", "kl"):
            if k in old["args"]:
                setattr(args, k, old["args"][k])
    base = json.loads(out.read_text()) if args.extend else None
    if base is not None:  # its predictor rows; only the directions are fitted
        args.predictors_from = str(out)
    model = steerlin.load_model(args.model)
    nc, no = (int(x) for x in args.sizes.split(","))
    pfrom = {}
    if args.predictors_from and old is None:  # the directions only; the predictor rows copied
        pfrom = json.loads(Path(args.predictors_from).read_text())
        for k in ("task", "model", "sizes", "d"):
            if pfrom["args"][k] != getattr(args, k):
                raise SystemExit(
                    f"--predictors-from: {k} {pfrom['args'][k]!r} != {getattr(args, k)!r}"
                )
        tk = steerlin.load_task(TASKS[args.task], data_dir=args.data_dir)
        sp = tk.split(nc, no, 0, seed=0)  # as predictors() does
        dirs = steerlin.ConceptDirections.fit(
            model, sp.concept.texts, sp.concept.labels, label_names=tk.spec.class_names
        )
        preds = {n: torch.tensor(v, dtype=F64) for n, v in pfrom["predictors"].items()}
        timings = {}
        pfrom = {"predictors_from": Path(args.predictors_from).name}
    else:
        dirs, preds, timings = predictors(model, args.task, nc, no, args.d, args.data_dir, log)
    if old is not None:
        res = old | {"predictors": {n: p.tolist() for n, p in preds.items()}}
        res["timings_s"] = old.get("timings_s", {}) | timings
        res["rescored"] = "predictors recomputed by --rescore; judged sweep as run"
        score_and_write(res, out, img, title, log)
        return
    if base is not None:
        extend(base, args, model, dirs, out, img, title, log)
        return
    log(f"{args.task}: per-layer sweep:")
    t = time.time()
    levels = [float(x) for x in args.kl.split(",")]
    partial = {"args": vars(args), "predictors": {n: p.tolist() for n, p in preds.items()}}
    partial |= pfrom
    save = lambda judged: out.write_text(json.dumps(partial | {"judged": judged, "partial": True}))
    stems = neutral_stems()
    held = (
        stems["eval"] + stems["extra"] if args.stems == "all" else stems["eval"][: 12 * args.seeds]
    )
    amps = src = None
    if args.amplitudes_from:
        src = json.loads(Path(args.amplitudes_from).read_text())
        for k in ("task", "model"):
            if src["args"][k] != getattr(args, k):
                raise SystemExit(
                    f"--amplitudes-from: {k} {src['args'][k]!r} != {getattr(args, k)!r}"
                )
        amps = {k: rec["amp"] for k, rec in src["judged"].items()}
        src = f"{Path(args.amplitudes_from).name} (bisected there on the 12 calibration stems)"
    partial["stems"] = held
    merge = lambda judged: judged
    if args.resume and out.exists():
        prev = json.loads(out.read_text())
        if not prev.get("partial") or prev.get("stems") != held:
            raise SystemExit(f"--resume: {out.name} is not a partial sweep of these stems")
        done = len(next(iter(prev["judged"].values()))["amp"])
        dirs = _without_layers(dirs, done)
        merge = lambda judged: _resumed(prev["judged"], judged, done)
        log(f"resuming {out.name} after layer {done - 1}")
    save = lambda judged: out.write_text(
        json.dumps(partial | {"judged": merge(judged), "partial": True})
    )
    judged = layer_effects(
        model,
        dirs,
        SETTINGS[args.task].judge,
        levels,
        stems=held,
        tokens=args.tokens,
        amplitudes=amps,
        amplitude_source=src,
        log=log,
        on_layer=save,
    )
    judged = merge(judged)
    timings["sweep"] = time.time() - t
    res = {
        "command": "python benchmarks/where_to_steer.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if v not in (False, None, "") and k != "rescore"
        ),
        "args": vars(args),
        "predictors": {n: p.tolist() for n, p in preds.items()},
        "judged": judged,
        "stems": held,
        "timings_s": timings,
    } | pfrom
    score_and_write(res, out, img, title, log)


def _without_layers(dirs, done: int):
    """The directions with layers 0..done-1 zeroed: `layer_effects` skips them (NaN)."""
    import dataclasses

    scale = dirs.scale.clone()
    scale[:done] = 0
    return dataclasses.replace(dirs, scale=scale)


def _resumed(prev: dict, new: dict, done: int) -> dict:
    """A resumed sweep: layers before `done` from the partial file, the rest from the new run."""
    out = {}
    for k, rec in new.items():
        out[k] = dict(rec)
        for key, v in rec.items():
            if isinstance(v, list):
                out[k][key] = list(prev[k][key][:done]) + list(v[done:])
    return out


def extend(base: dict, args, model, dirs, out: Path, img: Path, title: str, log) -> None:
    """--extend: judge the held-out stems (evaluation + extra) that the result file `base`
    lacks, at its amplitudes, and merge them into it (`ground_truth.merge_stems`); partial
    results go to <out>_extend_partial.json meanwhile."""
    stems = neutral_stems()
    have = set(base["stems"])
    new = [s for s in stems["eval"] + stems["extra"] if s not in have]
    if not new:
        raise SystemExit(f"--extend: {out.name} already has every held-out stem")
    log(f"{args.task}: per-layer sweep of {len(new)} new stems at {out.name}'s amplitudes:")
    t = time.time()
    part = out.with_name(out.stem + "_extend_partial.json")
    amps = {k: rec["amp"] for k, rec in base["judged"].items()}
    judged = layer_effects(
        model,
        dirs,
        SETTINGS[args.task].judge,
        [float(k) for k in amps],
        stems=new,
        tokens=base["args"]["tokens"],
        amplitudes=amps,
        amplitude_source=f"{out.name}",
        log=log,
        on_layer=lambda j: part.write_text(json.dumps({"stems": new, "judged": j})),
    )
    res = {k: v for k, v in base.items() if k not in ("scores", "reliability", "table")}
    res |= {"judged": gt.merge_stems(base["judged"], judged), "stems": base["stems"] + new}
    res["extended"] = base.get("extended", []) + [
        {"stems_added": len(new), "sweep_s": time.time() - t, "amplitudes": "the file's own"}
    ]
    score_and_write(res, out, img, title, log)
    part.unlink()


RELIABILITY_RUNS = [  # (label, result-file stem, KL level): a 3-seed file, a 1-seed one or 144
    ("Gemma-3-270m SST-2", "sst2", "0.1"),
    ("Gemma-3-270m SST-2", "sst2", "0.3"),
    ("Gemma-3-270m hate", "hate", "0.1"),
    ("SmolLM2-135M SST-2", "sst2_smollm2-135m", "0.1"),
    ("SmolLM2-135M hate", "hate_smollm2-135m", "0.1"),
]


def _old_halves(res_dir: Path, stem: str, k: str) -> dict | None:
    """The 12-vs-24 estimate from the saved 1-seed and 3-seed sweeps (no per-stem scores): the
    1-seed sweep (its own bisected amplitudes, within the 5% tolerance of the 3-seed ones)
    judged the first 12 of the 3-seed sweep's 36 stems; the other 24 are recovered as
    (3·mean36 − mean12)/2; `predictors.split_half_reliability` (unequal halves)."""
    one_name = f"where_to_steer_{stem}.json" if k == "0.1" else f"where_to_steer_{stem}_kl{k}.json"
    if not (res_dir / one_name).exists():
        return None
    one = json.loads((res_dir / one_name).read_text())
    three = json.loads((res_dir / f"where_to_steer_{stem}_3seeds.json").read_text())
    s12 = np.array(one["judged"][k]["delta"], dtype=float)
    m36 = np.array(three["judged"][k]["delta"], dtype=float)
    amp = np.abs(np.array(one["judged"][k]["amp"]) / np.array(three["judged"][k]["amp"]) - 1)
    rel = pr.split_half_reliability(s12, (3 * m36 - s12) / 2, 12, 24)
    return rel | {"amplitude_mismatch_max": float(np.nanmax(amp))}


def _merge_predictors(res: dict, src: dict, src_name: str, log) -> bool:
    """Predictor rows of `src` (the 3-seed sweep of the same task and model) that `res` lacks
    are copied into it: the predictors do not depend on the judged stems (concept/operating
    splits and calibration stems only), and the rows both have must agree (1e-4), else
    nothing is copied. True if rows were added (recorded in res["predictors_merged_from"])."""
    keys = ("task", "model", "sizes", "d")
    if any(res["args"].get(k) != src["args"].get(k) for k in keys):
        return False
    new = [n for n in src["predictors"] if n not in res["predictors"]]
    for n, v in res["predictors"].items():
        if n in src["predictors"] and not np.allclose(
            np.array(v, dtype=float),
            np.array(src["predictors"][n], dtype=float),
            rtol=1e-4,
            atol=1e-9,
            equal_nan=True,
        ):
            log(f"predictor {n!r} differs from {src_name}: rows not merged")
            return False
    if not new:
        return False
    res["predictors"] |= {n: src["predictors"][n] for n in new}
    res["predictors_merged_from"] = {"file": src_name, "rows": new}
    log(f"merged predictor rows {new} from {src_name}")
    return True


def reliability(log) -> dict:
    """Split-half reliability of the judged per-layer curve from the saved sweeps, no model run.

    Where a `--stems all` sweep saved every stem's judged score (where_to_steer_<stem>_144stems
    .json: 144 stems, or 180 after `--extend`): `ground_truth.split_half_reliability` over all
    its stems (200 random equal halves, Spearman-Brown; mean and 5-95% spread), over random
    subsets of 36..144 stems, on its first 36 stems alone (the 3-seed sweep's), and the check
    that those 36 stems reproduce the 3-seed sweep's curve (same amplitudes, greedy decoding);
    predictors are scored against the all-stem curve. Elsewhere
    (labelled "12 vs 24"): the 12-vs-24 estimate of `_old_halves` on the 3-seed sweep's 36
    stems. Each predictor's Spearman is set beside the ceiling sqrt(reliability) and as a
    fraction of it."""
    res_dir = ROOT / "benchmarks" / "results"
    out, lines = {}, []
    lines.append(
        "| setting | KL | stems | reliability [5%, 95%] | ceiling √rel | reliability of 36 "
        "(12 vs 24 / random halves) | predictor: ρ (fraction of ceiling) |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for label, stem, k in RELIABILITY_RUNS:
        three = json.loads((res_dir / f"where_to_steer_{stem}_3seeds.json").read_text())
        old = _old_halves(res_dir, stem, k)
        big_path = res_dir / f"where_to_steer_{stem}_144stems.json"
        big = json.loads(big_path.read_text()) if big_path.exists() else {}
        rec = big.get("judged", {}).get(k, {})
        row = {"setting": label, "kl": k, "halves_12_vs_24": old}
        if len(rec.get("plus_stems", [])) >= 3:  # a Spearman over at least 3 layers
            d = gt.stem_deltas(rec)  # [layers done, stems]
            done, L = d.shape[0], len(three["judged"][k]["delta"])
            rel = gt.split_half_reliability(d)
            sizes = [n for n in (36, 72, 108, 144) if n < d.shape[1]]
            by_n = {n: gt.split_half_reliability(d, n_stems=n) for n in sizes}
            rel36 = gt.split_half_reliability(d[:, :36])
            m36 = np.array(three["judged"][k]["delta"], dtype=float)[:done]
            diff = np.abs(d[:, :36].mean(1) - m36)
            row |= {
                "method": f"{d.shape[1]} stems, random halves"
                + (f" (partial: layers 0-{done - 1} of {L})" if done < L else ""),
                **rel,
                "layers_done": done,
                "random_subsets": {n: v["reliability"] for n, v in by_n.items()},
                "first_36": rel36,
                "reproduces_3seeds_max_abs_diff": float(np.nanmax(diff)),
                "reproduces_3seeds_layers_differing": int((diff > 1e-9).sum()),
            }
            if done == L and "scores" in big:
                if _merge_predictors(big, three, f"where_to_steer_{stem}_3seeds.json", log) or (
                    "reliability" not in big  # written before the table carried the ceiling
                ):
                    a = big["args"]
                    title = f"{a['model']}, {a['task']}: judged effect per layer at matched KL"
                    img = ROOT / "docs" / "img" / f"where_to_steer_{stem}_144stems.png"
                    score_and_write(big, big_path, img, title + " vs predictors", log)
                scores = big["scores"][k]
            else:  # a partial sweep: the predictors on the layers judged so far
                dl = torch.tensor(rec["delta"], dtype=F64)
                ok = ~torch.isnan(dl)
                scores = pr.score_predictors(
                    {
                        n: torch.tensor(v[:done], dtype=F64)[ok]
                        for n, v in big["predictors"].items()
                    },
                    dl[ok],
                )
            n_st = f"{d.shape[1]}" + (f" ({done}/{L} layers)" if done < L else "")
            r36 = f"{old['reliability']:.2f} / {rel36['reliability']:.2f}" if old else "–"
            rel_cell = (
                f"{rel['reliability']:.2f} [{rel['reliability_q05']:.2f}, "
                f"{rel['reliability_q95']:.2f}]"
            )
        elif old is not None:
            rel = old
            row |= {"method": "12 vs 24 stems (no per-stem file)", **old}
            scores, n_st = three["scores"][k], "36 (12 vs 24)"
            r36, rel_cell = f"{old['reliability']:.2f} / –", f"{old['reliability']:.2f}"
        else:
            continue
        row["scores"] = gt.score_with_ceiling(scores, rel["ceiling"])
        out[f"{stem}@{k}"] = row
        cells = "; ".join(
            f"{n} {v['spearman']:+.2f} ({v['fraction_of_ceiling']:+.2f})"
            if v["fraction_of_ceiling"] is not None
            else f"{n} {v['spearman']:+.2f}"
            for n, v in row["scores"].items()
        )
        lines.append(
            f"| {label} | {k} | {n_st} | {rel_cell} | {rel['ceiling']:.2f} | {r36} | {cells} |"
        )
    table = "\n".join(lines)
    log(table)
    res = {"method": reliability.__doc__, "runs": out, "table": table}
    path = res_dir / "where_to_steer_reliability.json"
    path.write_text(json.dumps(res, indent=1))
    log(f"wrote {path}")
    return res


if __name__ == "__main__":
    import sys

    if "--reliability" in sys.argv:
        reliability(lambda m: print(m, flush=True))
    else:
        main()
