"""The per-layer ground truth judged twice: VADER and independent judges on the same texts.

    python benchmarks/second_judge.py --stems 72          # Gemma-3-270m, SST-2, KL 0.1

Issue 35: where a judge's own lexicon is the readout (the in-regime VADER-lexicon predictor), the
text is also judged by a judge that did not supply the readout, so no readout is scored only by
itself. The sweep is `steerlin.ground_truth.layer_effects` at the matched-KL amplitudes of the
saved per-stem sweep (`where_to_steer_sst2_144stems.json`: defined on the calibration stems, so
they do not depend on the judged stems), on its first `--stems` held-out stems, greedy 20 tokens,
and every generated text is scored by VADER, TextBlob polarity and AFINN (`steerlin.judges`).
Per judge: the per-layer Δ(+,−) curve, its split-half reliability and ceiling, and every saved
predictor's Spearman with it (and as a fraction of the ceiling). VADER's per-stem scores must
equal the saved sweep's on the same stems (greedy, same batches): checked and reported.
Writes benchmarks/results/where_to_steer_sst2_second_judge.json.
"""

from __future__ import annotations

import argparse
import json
import time

import _common as C
import numpy as np
import torch

import steerlin
from steerlin import ground_truth as gt
from steerlin import predictors as pr
from steerlin.judges import get_judge
from steerlin.steer_eval import TASKS

JUDGES = ("vader", "textblob", "afinn")


class Recorder:
    """A judge for `layer_effects` that returns the first judge's scores and keeps every
    judge's scores of the same texts, in call order (layer, sign, batch)."""

    def __init__(self, names):
        self.fns = {n: get_judge(n) for n in names}
        self.first = names[0]
        self.scores = {n: [] for n in names}

    def __call__(self, texts):
        for n, f in self.fns.items():
            self.scores[n].append(np.asarray(f(texts), dtype=float))
        return self.scores[self.first][-1]


def per_stem(scores: list, layers: list[int], L: int, n: int) -> np.ndarray:
    """Call-ordered batches -> Δ per stem [L, n] (NaN rows for layers with no direction)."""
    flat = np.concatenate(scores).reshape(len(layers), 2, n)
    out = np.full((L, n), np.nan)
    out[layers] = flat[:, 0] - flat[:, 1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stems", type=int, default=72, help="first N of the saved sweep's stems")
    ap.add_argument("--source", default="where_to_steer_sst2_144stems.json")
    ap.add_argument("--level", default="0.1")
    ap.add_argument("--data-dir", default=str(C.DEFAULT_DATA))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", default=None, help="comma list (quick checks); default all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)
    src = json.loads((C.RESULTS / args.source).read_text())
    sa = src["args"]
    rec0 = src["judged"][args.level]
    model = steerlin.load_model(sa["model"])
    L = model.cfg.n_layers
    nc, _ = (int(x) for x in sa["sizes"].split(","))
    tk = steerlin.load_task(TASKS[sa["task"]], data_dir=args.data_dir)
    sp = tk.split(nc, int(sa["sizes"].split(",")[1]), 0, seed=0)
    dirs = steerlin.ConceptDirections.fit(
        model, sp.concept.texts, sp.concept.labels, label_names=tk.spec.class_names
    )
    stems = list(src["stems"])[: args.stems]
    amps = np.asarray(rec0["amp"], dtype=float)
    layers = [i for i in range(L) if np.isfinite(amps[i])]
    if args.layers:
        keep = {int(x) for x in args.layers.split(",")}
        layers = [i for i in layers if i in keep]
        amps = np.where(np.isin(np.arange(L), layers), amps, np.nan)
    log(f"{len(stems)} stems, layers {layers}, amplitudes from {args.source}")
    rec = Recorder(list(JUDGES))
    t0 = time.time()
    # layers left out are zeroed directions: layer_effects then skips them (NaN)
    d = dirs if not args.layers else _only(dirs, layers)
    out = gt.layer_effects(
        model,
        d,
        rec,
        [float(args.level)],
        stems=stems,
        tokens=int(sa["tokens"]),
        amplitudes={float(args.level): np.nan_to_num(amps, nan=1.0).tolist()},
        amplitude_source=args.source,
        log=log,
    )
    wall = time.time() - t0
    n = len(stems)
    curves = {j: per_stem(rec.scores[j], layers, L, n) for j in JUDGES}
    saved = gt.stem_deltas(rec0)[:, :n]
    same = np.nanmax(np.abs(curves["vader"][layers] - saved[layers]))
    log(f"VADER per-stem Δ vs the saved sweep, max abs difference: {same:.2e}")
    preds = {k: np.asarray(v, dtype=float) for k, v in src["predictors"].items()}
    res = {
        "command": "python benchmarks/second_judge.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, "")
        ),
        "stems": n,
        "layers": layers,
        "wall_s": wall,
        "vader_reproduces_saved_max_abs": float(same),
    }
    res["judges"] = {}
    for j in JUDGES:
        x = curves[j][layers]
        curve = x.mean(1)
        rel = gt.split_half_reliability(x) if len(layers) >= 3 else None
        ceil = rel["ceiling"] if rel else float("nan")
        sc = pr.score_predictors({k: v[layers] for k, v in preds.items()}, curve)
        for v in sc.values():
            v["top_layer"] = layers[v["top_layer"]]
            v["fraction_of_ceiling"] = v["spearman"] / ceil if rel else None
        res["judges"][j] = {"delta": curve.tolist(), "reliability": rel, "scores": sc}
    from scipy.stats import spearmanr

    res["judge_agreement_spearman"] = {
        f"vader~{j}": float(
            spearmanr(curves["vader"][layers].mean(1), curves[j][layers].mean(1))[0]
        )
        for j in JUDGES[1:]
    }
    lines = ["| predictor | " + " | ".join(f"{j}: ρ (ρ/ceiling)" for j in JUDGES) + " |"]
    lines.append("|---|" + "---|" * len(JUDGES))
    lines.append(
        "| reliability [5-95%] / ceiling | "
        + " | ".join(
            f"{r['reliability']:.2f} [{r['reliability_q05']:.2f}, {r['reliability_q95']:.2f}]"
            f" / {r['ceiling']:.2f}"
            if (r := res["judges"][j]["reliability"])
            else "—"
            for j in JUDGES
        )
        + " |"
    )
    for k in preds:
        cells = []
        for j in JUDGES:
            s = res["judges"][j]["scores"][k]
            f = s["fraction_of_ceiling"]
            cells.append(
                f"{s['spearman']:+.2f} ({f:+.2f})" if f is not None else f"{s['spearman']:+.2f}"
            )
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    res["table"] = "\n".join(lines)
    log("\n" + res["table"])
    log(f"judges' curves agree (Spearman): {res['judge_agreement_spearman']}")
    path = C.RESULTS / "where_to_steer_sst2_second_judge.json"
    if args.layers:
        path = path.with_name(path.stem + "_quick.json")
    path.write_text(json.dumps(res, indent=1))
    log(f"wrote {path} ({wall:.0f} s sweep; {out[args.level]['n_stems']} stems)")


def _only(dirs, layers):
    """The directions with every other layer's scale zeroed (nothing injected there)."""
    import dataclasses

    scale = dirs.scale.clone()
    mask = torch.ones_like(scale, dtype=torch.bool)
    mask[layers] = False
    scale[mask] = 0
    return dataclasses.replace(dirs, scale=scale)


if __name__ == "__main__":
    main()
