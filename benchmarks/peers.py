"""The peers' own code on Gemma-3-270m (issue 21): steering-vectors and repeng, run natively on
the Hugging Face model built from steerlin's offline GGUF, judged like steer-eval.

    python benchmarks/peers.py                    # SST-2, 3 seeds x 12 held-out stems, 30 tokens
    python benchmarks/peers.py --task hate        # TweetEval hate (alt-profanity-check)
    python benchmarks/peers.py --quick            # small: checks that it runs (~5 min)

Per peer: train on steer-eval's concept split (task.split(200, 50, 0, seed=0), label 1 as the
positive examples, paired in order with label 0), with the peer's own documented layers
(steering-vectors: mean difference on every decoder block; repeng: PCA of paired differences on
layers 1..n-1, steered on its README's ControlModel layers, range(-5, -18, -1)). Sweep the
coefficient on the peer's own scale with its own apply mechanism (both signs), generating
greedy continuations of steer-eval's 12 calibration stems; pick the coefficient with the
largest judged Δ(+,−) whose worse-sign perplexity ratio is <= 1.5 (calibration stems only);
then generate the held-out stems (steer-eval's 3 seeds x 12) at ± that coefficient.

Measured as steer-eval measures (its functions): the judge (VADER / alt-profanity-check), the
perplexity of the continuation under the unsteered model and the model's own concept readout
of the finished text (`steerlin.measure.continuation_scores` on the steerlin TransformerLens
model, fed the peers' generated token ids: identical tokenizer ids are checked), summaries by
`steerlin.steer_eval.summarise`. KL: regime_kl's definition (next-token KL along the unsteered
continuation, first --kl-tokens positions) through the peer's own hooks on the Hugging Face
model, with every position steered as the peers steer (cross-checked against
`steerlin.measure.regime_kl(positions="all")` on the TransformerLens model where the peer's
layers allow). Cost: tokens forwarded to train and to search (generations, plus the perplexity
scoring the selection rule needs), and generations spent; wall seconds of each.

Writes benchmarks/results/peers.json (sst2) or peers_<task>.json (`_quick` for --quick).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, RESULTS, environment, say, write_results  # noqa: E402

import steerlin  # noqa: E402
from steerlin import peers  # noqa: E402
from steerlin.judges import get_judge  # noqa: E402
from steerlin.measure import continuation_scores, regime_kl  # noqa: E402
from steerlin.readouts import make_readout  # noqa: E402
from steerlin.regime import Continuations  # noqa: E402
from steerlin.steer_eval import (  # noqa: E402
    SETTINGS,
    TASKS,
    neutral_stems,
    per_seed_ppl,
    summarise,
)

#: Coefficient grids on each peer's own scale (multiplier of the raw mean difference; repeng's
#: coefficient = injected norm per layer of its unit directions).
GRIDS = {
    "steering-vectors": "0.0625,0.088,0.125,0.177,0.25",
    "repeng": "16,32,64,128,256,512",
}


def as_cont(g: peers.Generations) -> Continuations:
    return Continuations(list(g.prompts), g.prompt_ids, g.new_ids, g.texts)


def hidden_agreement(tl, hf, tok, prompt: str) -> dict:
    """Max relative difference of HF hidden_states[n + 1] and TL blocks.n.hook_resid_post
    (n < L - 1: HF's last hidden state is after the final norm): the same x_{n+1}."""
    L = tl.cfg.n_layers
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        hs = hf(**enc, output_hidden_states=True).hidden_states
        _, cache = tl.run_with_cache(prompt, names_filter=lambda n: n.endswith("hook_resid_post"))
    rel = []
    for n in range(L - 1):
        a, b = hs[n + 1][0].double(), cache[f"blocks.{n}.hook_resid_post"][0].double()
        rel.append(float((a - b).norm() / b.norm()))
    return {"max_rel_diff": max(rel), "per_layer": rel}


def run_point(tl, hf, tok, pv, coeff, stems, base, rd, judge, args, seed_of, n_seeds):
    """Generate ±-signed `coeff` once (one sign), judge, score; returns (row, costs)."""
    t0 = time.perf_counter()
    g = peers.generate(hf, tok, stems, args.tokens, vector=pv, coeff=coeff)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc = continuation_scores(tl, as_cont(g), rd)
    t_score = time.perf_counter() - t0
    jd = judge(g.texts)
    t0 = time.perf_counter()
    kl = peers.next_token_kl(hf, base["gens"], pv, coeff, n_new=min(args.kl_tokens, args.tokens))
    t_kl = time.perf_counter() - t0
    norms = pv.injected_norms(coeff)
    scale = base["scale"]
    row = {
        "strategy": pv.peer,
        "t": float(coeff),
        "layers": list(pv.steerlin_layers),
        "multiplier": float(coeff),
        "judge": per_seed(jd, seed_of, n_seeds),
        "readout": per_seed(
            ((sc["readout"] - base["readout"]) / base["sep"]).numpy(), seed_of, n_seeds
        ),
        "ppl": per_seed_ppl(sc["nll"].numpy(), seed_of, n_seeds),
        "kl": [kl] * n_seeds,
        "energy_raw": float(sum(v**2 for v in norms.values())),
        "energy_norm": float(sum((v / float(scale[layer])) ** 2 for layer, v in norms.items())),
        "kl_pred": float("nan"),
        "injected_norm": {str(k): v for k, v in norms.items()},
    }
    cost = {
        "gen_tokens": g.forward_tokens,
        "score_tokens": g.forward_tokens,  # one unsteered forward over prompt + continuation
        "generations": len(g),
        "gen_s": t_gen,
        "score_s": t_score,
        "kl_s": t_kl,
    }
    return row, cost, g.texts


def per_seed(values, seed_of, n_seeds):
    values = np.asarray(values, dtype=np.float64)
    return [float(np.mean(values[seed_of == k])) for k in range(n_seeds)]


def unsteered(tl, hf, tok, stems, rd, judge, args, seed_of, n_seeds, sep, scale):
    g = peers.generate(hf, tok, stems, args.tokens)
    ids_ok = all(g.prompt_ids[i] == tl.to_tokens(p)[0].tolist() for i, p in enumerate(stems))
    if not ids_ok:
        raise SystemExit("the HF and TransformerLens tokenizers disagree on the stems' ids")
    sc = continuation_scores(tl, as_cont(g), rd)
    jd = judge(g.texts)
    row = {
        "strategy": "unsteered",
        "t": 0.0,
        "judge": per_seed(jd, seed_of, n_seeds),
        "readout": [0.0] * n_seeds,
        "ppl": per_seed_ppl(sc["nll"].numpy(), seed_of, n_seeds),
        "kl": [0.0] * n_seeds,
        "energy_norm": 0.0,
        "energy_raw": 0.0,
        "kl_pred": 0.0,
    }
    base = {"gens": g, "readout": sc["readout"], "sep": sep, "scale": scale}
    return row, base, g.texts


def select(summary: list[dict], max_ppl: float) -> tuple[dict, str]:
    ok = [r for r in summary if "delta" in r and r["ppl_worst"] <= max_ppl]
    if ok:
        return max(ok, key=lambda r: r["delta"]), f"largest Δ with ppl ratio <= {max_ppl}"
    smallest = min((r for r in summary if "delta" in r), key=lambda r: r["t"])
    return smallest, f"no coefficient kept ppl ratio <= {max_ppl}: the smallest"


def fmt_sd(sd: float) -> str:
    return "" if sd is None or (isinstance(sd, float) and math.isnan(sd)) else f" ± {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="sst2")
    ap.add_argument("--peers", default=",".join(peers.PEERS))
    ap.add_argument("--sizes", default="200,50", help="concept,operating per class (steer-eval's)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of held-out stems (max 3)")
    ap.add_argument("--stems", type=int, default=12, help="held-out stems per seed (max 12)")
    ap.add_argument("--cal-stems", type=int, default=12, help="calibration stems (max 12)")
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--kl-tokens", type=int, default=10)
    ap.add_argument("--max-ppl", type=float, default=1.5)
    ap.add_argument("--sv-coeffs", default=GRIDS["steering-vectors"])
    ap.add_argument("--repeng-coeffs", default=GRIDS["repeng"])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument(
        "--fixed",
        default="",
        help="PEER=COEFF,...: no sweep for PEER, held-out at ±COEFF (COEFF < 0 flips its sign)",
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.seeds, args.stems, args.cal_stems, args.tokens = "32,16", 1, 4, 4, 8
        args.sv_coeffs, args.repeng_coeffs = "0.0625,0.125", "64,256"
    if not 1 <= args.seeds <= 3 or not 1 <= args.stems <= 12 or not 1 <= args.cal_stems <= 12:
        raise SystemExit("--seeds: 1..3, --stems / --cal-stems: 1..12")
    fixed = {k: float(v) for k, v in (x.split("=") for x in args.fixed.split(",") if x)}
    torch.set_num_threads(args.threads)
    env = environment(args)
    t_all = time.perf_counter()

    tl = steerlin.load_model("gemma-3-270m")
    t0 = time.perf_counter()
    hf, tok = peers.load_hf_model("gemma-3-270m")
    say(f"Hugging Face Gemma-3-270m from the GGUF in {time.perf_counter() - t0:.0f} s")
    L = tl.cfg.n_layers
    stems = neutral_stems()
    cal = stems["calibration"][: args.cal_stems]
    seeds = [stems["eval"][12 * k : 12 * k + args.stems] for k in range(args.seeds)]
    flat = [p for s in seeds for p in s]
    seed_of = np.concatenate([[k] * len(s) for k, s in enumerate(seeds)])
    agree = hidden_agreement(tl, hf, tok, cal[0])
    say(f"HF vs TransformerLens residual x_1..x_{L - 1}: max rel diff {agree['max_rel_diff']:.2e}")

    # steer-eval's concept split, directions (for the own readout and norm-relative energy)
    nc, no = (int(x) for x in args.sizes.split(","))
    tk = steerlin.load_task(TASKS[args.task], data_dir=args.data_dir)
    sp = tk.split(nc, no, 0, seed=0)
    texts, labels = list(sp.concept.texts), list(sp.concept.labels)
    positives = [t for t, y in zip(texts, labels, strict=True) if y == 1]
    negatives = [t for t, y in zip(texts, labels, strict=True) if y == 0]
    n_pairs = min(len(positives), len(negatives))
    positives, negatives = positives[:n_pairs], negatives[:n_pairs]
    dirs = steerlin.ConceptDirections.fit(tl, texts, labels, label_names=tk.spec.class_names)
    sep = float(dirs.vectors[-1].double().norm())
    scale = dirs.scale.double()
    rd = make_readout(tl, "concept", dirs.unit[-1])
    setting = SETTINGS[args.task]
    judge = get_judge(setting.judge)

    t0 = time.perf_counter()
    cal_seed = np.zeros(len(cal), dtype=int)
    cal_row, cal_base, cal_texts = unsteered(
        tl, hf, tok, cal, rd, judge, args, cal_seed, 1, sep, scale
    )
    ev_row, ev_base, ev_texts = unsteered(
        tl, hf, tok, flat, rd, judge, args, seed_of, len(seeds), sep, scale
    )
    say(
        f"unsteered: {setting.judge} cal {np.mean(cal_row['judge']):+.3f}, held-out "
        f"{np.mean(ev_row['judge']):+.3f}; ppl {np.mean(ev_row['ppl']):.3f} "
        f"({time.perf_counter() - t_all:.0f} s in)"
    )
    out_peers: dict[str, dict] = {}
    samples = {"prompt": flat, "unsteered": ev_texts}
    grids = {"steering-vectors": args.sv_coeffs, "repeng": args.repeng_coeffs}

    def save():  # the JSON so far (after each peer) and the printed tables at the end
        return write(
            out_peers,
            setting,
            args,
            env,
            t_all,
            sep,
            agree,
            cal_row,
            ev_row,
            samples,
            cal,
            cal_texts,
        )

    for name in args.peers.split(","):
        why = peers.available(name)
        if why is not None:
            say(f"{name}: skipped ({why})")
            out_peers[name] = {"skipped": why}
            continue
        pv = peers.train(name, hf, tok, positives, negatives)
        say(
            f"{name}: trained in {pv.train_seconds:.1f} s on {pv.train_texts} texts "
            f"({pv.train_tokens} tokens); steers x_l = {list(pv.steerlin_layers)}"
        )
        norms1 = pv.injected_norms(1.0)
        say(
            f"  injected norm per layer at coefficient 1: {min(norms1.values()):.3g}.."
            f"{max(norms1.values()):.3g}"
        )
        sweep_rows, sweep_costs = [cal_row], []
        for c in [] if name in fixed else [float(x) for x in grids[name].split(",")]:
            for sign in (1, -1):
                row, cost, _ = run_point(
                    tl, hf, tok, pv, sign * c, cal, cal_base, rd, judge, args, cal_seed, 1
                )
                sweep_rows.append(row)
                sweep_costs.append(cost)
                say(
                    f"  {name} {sign * c:+g} (cal): {setting.judge} {row['judge'][0]:+.3f} "
                    f"ppl {row['ppl'][0] / cal_row['ppl'][0]:.2f}x KL {row['kl'][0]:.3f}"
                )
        sweep = summarise({"rows": sweep_rows})
        if name in fixed:  # no search: the coefficient given (its sign: the + direction)
            best, rule = {"t": fixed[name], "delta": float("nan")}, "fixed by --fixed"
        else:
            best, rule = select(sweep, args.max_ppl)
        c = best["t"]
        say(f"{name}: selected coefficient {c:g} ({rule}; cal Δ {best['delta']:+.3f})")
        ev_rows, ev_costs = [ev_row], []
        for sign in (1, -1):
            row, cost, txt = run_point(
                tl, hf, tok, pv, sign * c, flat, ev_base, rd, judge, args, seed_of, len(seeds)
            )
            row["t"] = sign * abs(c)  # + is the sign meant to move toward label 1
            ev_rows.append(row)
            ev_costs.append(cost)
            samples[f"{name} {sign * c:+g}"] = txt
        summ = summarise({"rows": ev_rows})[0]
        kl_check = None
        if max(pv.steerlin_layers) < L:  # every injection is a resid_pre of the TL model
            vec = pv.steerlin_vectors(c)[:L].to(torch.float32)
            kl_tl = regime_kl(
                tl,
                as_cont(ev_base["gens"]),
                vec,
                positions="all",
                n_new=min(args.kl_tokens, args.tokens),
            )
            kl_check = {"kl_hf_plus": ev_rows[1]["kl"][0], "kl_tl_regime_kl_plus": kl_tl}
        search_tokens = sum(x["gen_tokens"] + x["score_tokens"] for x in sweep_costs)
        search_s = sum(x["gen_s"] + x["score_s"] for x in sweep_costs)
        rec = {
            "peer": name,
            "layers_peer": list(pv.layers),
            "layers_steerlin": list(pv.steerlin_layers),
            "train": {
                "seconds": pv.train_seconds,
                "texts": pv.train_texts,
                "tokens": pv.train_tokens,
                "meta": pv.meta,
            },
            "injected_norm_at_1": {str(k): v for k, v in norms1.items()},
            "grid": [float(x) for x in grids[name].split(",")],
            "sweep_rows": sweep_rows[1:],
            "sweep_summary": sweep,
            "sweep_costs": sweep_costs,
            "selected": {"coeff": c, "rule": rule, "calibration": best},
            "heldout_rows": ev_rows[1:],
            "heldout": summ,
            "heldout_costs": ev_costs,
            "kl_check": kl_check,
            "cost": {
                "train_tokens": pv.train_tokens,
                "search_tokens": search_tokens,
                "total_tokens": pv.train_tokens + search_tokens,
                "search_generations": sum(x["generations"] for x in sweep_costs),
                "train_s": pv.train_seconds,
                "search_s": search_s,
                "total_s": pv.train_seconds + search_s,
                "heldout_generations": sum(x["generations"] for x in ev_costs),
                "heldout_gen_s": sum(x["gen_s"] for x in ev_costs),
            },
            "injected_norm_selected": ev_rows[1]["injected_norm"],
        }
        out_peers[name] = rec
        say(
            f"{name} {c:g} held-out: Δ {summ['delta']:+.3f}{fmt_sd(summ['delta_sd'])} ppl "
            f"{summ['ppl_worst']:.2f}x KL {summ['kl']:.3f} ({time.perf_counter() - t_all:.0f} s in)"
        )

        save()
    print(save())


def write(
    out_peers, setting, args, env, t_all, sep, agree, cal_row, ev_row, samples, cal, cal_texts
):
    """Write the JSON (after each peer, so a late failure keeps what ran); return the tables."""
    table = markdown(out_peers, setting.judge, args)
    sweep_table = markdown_sweep(out_peers, setting.judge)
    payload = {
        "task": args.task,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sign": {"+": setting.plus, "-": setting.minus},
        "separation": sep,
        "hidden_agreement": agree,
        "unsteered": {"calibration": cal_row, "heldout": ev_row},
        "peers": out_peers,
        "samples": samples,
        "calibration_samples": {"prompt": cal, "unsteered": cal_texts},
        "table": table,
        "sweep_table": sweep_table,
        "wall_s": time.perf_counter() - t_all,
        "note": (
            "repeng's pca_diff centres the paired differences (scikit-learn PCA), removing "
            "their mean: its direction is not the mean difference (the peer as users run it)."
        ),
    }
    name = "peers" if args.task == "sst2" else f"peers_{args.task}"
    if args.out is None:
        args.out = RESULTS / f"{name}{'_quick' if args.quick else ''}.json"
    write_results(name, args, env, payload)
    return sweep_table + "\n\n" + table


def markdown(out: dict, judge: str, args) -> str:
    lines = [
        f"| peer (coefficient) | steered x_l | injected ‖v‖ per layer | {judge} Δ(+,−) ± sd "
        f"({args.seeds} seeds × {args.stems}) | {judge} + / − | own readout Δ | ppl ratio + / − "
        "| KL (nats/token) | cost: train + search tokens (search generations) | wall: train + "
        "search s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in out.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: not installed | | | | | | | | |")
            continue
        s, c = r["heldout"], r["cost"]
        norms = list(r["injected_norm_selected"].values())
        lay = r["layers_steerlin"]
        lines.append(
            f"| {name} ({r['selected']['coeff']:g}) | {lay[0]}..{lay[-1]} ({len(lay)}) "
            f"| {min(norms):.3g}..{max(norms):.3g} | {s['delta']:+.3f}{fmt_sd(s['delta_sd'])} "
            f"| {s['judge_plus']:+.3f} / {s['judge_minus']:+.3f} | {s['readout_delta']:+.2f} "
            f"| {s['ppl_plus']:.2f} / {s['ppl_minus']:.2f} | {s['kl']:.3f} "
            f"| {c['train_tokens']} + {c['search_tokens']} ({c['search_generations']}) "
            f"| {c['train_s']:.0f} + {c['search_s']:.0f} |"
        )
    return "\n".join(lines)


def markdown_sweep(out: dict, judge: str) -> str:
    lines = [
        f"| peer | coefficient | {judge} Δ(+,−) (calibration stems) | ppl ratio worse sign "
        "| KL | injected ‖v‖ mean per layer | selected |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in out.items():
        if "skipped" in r:
            continue
        for s in r["sweep_summary"]:
            if "delta" not in s:
                continue
            norms = [v * s["t"] for v in r["injected_norm_at_1"].values()]
            sel = "**yes**" if s["t"] == r["selected"]["coeff"] else ""
            lines.append(
                f"| {name} | {s['t']:g} | {s['delta']:+.3f} | {s['ppl_worst']:.2f} "
                f"| {s['kl']:.3f} | {np.mean(norms):.3g} | {sel} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
