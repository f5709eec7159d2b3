"""Where the reduction fails and at what order it holds: the early layers (issue 23).

    python benchmarks/early_layers.py --task hate --seed 0 --orders 4,8,16,32,64,128,256
    python benchmarks/early_layers.py --plot-only      # the figure from the result files

One two-sided fit at max(orders) on the operating split (400/200/200 per class, the goal
size), nested orders by truncation (`Surrogate.fit_orders`). Per order, from the fit alone
(its observability pass computes the exact gains on the same prompts, `gains_exact`):

  reduction check   raw Spearman and median/max per-layer error of the reduced gains against
                    the exact ones (`Surrogate.reduction_error`);
  adjoint captured  per layer, the share of the prompts' ‖∂y(p)/∂x_l‖² that span(P_l) holds
                    (`Surrogate.adjoint_captured`): how much of each prompt's backward
                    dynamics a shared basis of that order carries;
  Hankel order      per layer, Hankel singular values above 1% of the largest
                    (`Surrogate.order(1e-2)`): how many dimensions the injection-to-readout
                    map uses there (an order equal to d means d is too small to tell).

Writes benchmarks/results/early_layers_<task>_seed<s>.json; --plot-only draws
docs/img/early_layers.png from every such file.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = {"sst2": "sst2", "irony": "tweet_eval_irony", "hate": "tweet_eval_hate"}


def run(task: str, seed: int, orders: list[int], sizes: str, data_dir: str, log) -> dict:
    model = steerlin.load_model("gemma-3-270m")
    tk = steerlin.load_task(TASKS[task], data_dir=data_dir)
    nc, no, ne = (int(x) for x in sizes.split(","))
    sp = tk.split(nc, no, ne, seed=seed)
    dirs = steerlin.ConceptDirections.fit(model, list(sp.concept.texts), list(sp.concept.labels))
    ops = list(sp.operating.texts)
    t = time.time()
    fits = steerlin.Surrogate.fit_orders(model, ops, dirs, orders=orders, seed=seed)
    wall = time.time() - t
    sc = dirs.scale[:-1].to(torch.float64)
    exact = fits[max(orders)].gains_exact
    out = {
        "task": task,
        "seed": seed,
        "sizes": sizes,
        "orders": orders,
        "fit_s": wall,
        "exact_raw": (exact / sc).tolist(),
    }
    log(f"{task} seed {seed}: one fit at d = {max(orders)} in {wall:.0f} s")
    top = (exact / sc).abs().max()
    for o, s in sorted(fits.items()):
        f = s.reduction_error()
        out[str(o)] = {
            "raw_spearman": f.raw_spearman,
            "rel_err_median": f.rel_err_median,
            "rel_err_max": f.rel_err_max,
            "rel_err": ((s.gains - exact).abs() / exact.abs()).tolist(),
            "raw": (s.gains / sc).tolist(),
            "adjoint_captured": s.adjoint_captured.tolist(),
            "hankel_order_1e-2": s.order(1e-2),
        }
        log(
            f"  d = {o:3d}: raw Spearman {f.raw_spearman:.3f}, median error "
            f"{f.rel_err_median:.1%}; layers 0-3 raw ÷ largest exact "
            f"{np.round(((s.gains / sc) / top).numpy()[:4], 2)} (exact "
            f"{np.round(((exact / sc) / top).numpy()[:4], 2)}); adjoint captured at layers 1-4 "
            f"{np.round(s.adjoint_captured.numpy()[1:5], 2)}, Hankel order "
            f"{s.order(1e-2)[1:5]}"
        )
    return out


def plot(paths: list[Path], img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for r in runs:
        ds = r["orders"]
        axes[0].plot(
            ds,
            [r[str(o)]["raw_spearman"] for o in ds],
            marker="o",
            label=f"{r['task']} s{r['seed']}",
        )
    axes[0].axhline(0.99, color="k", ls=":", lw=1, label="goal 0.99")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("order d (two-sided, per-prompt)")
    axes[0].set_ylabel("reduction: raw Spearman vs exact gains")
    axes[0].legend(fontsize=8)
    axes[0].set_title("reduction check vs order (400/200/200)")
    hate = [r for r in runs if r["task"] == "hate"] or runs
    r = hate[0]
    for o in r["orders"]:
        cap = r[str(o)]["adjoint_captured"][:-1]  # x_0..x_{L-1}; x_0 holds no injection yet
        axes[1].plot(range(1, len(cap)), cap[1:], marker=".", label=f"d = {o}")
    axes[1].set_xlabel("layer l (x_l)")
    axes[1].set_ylabel("share of Σ_p ‖∂y(p)/∂x_l‖² in span(P_l)")
    axes[1].set_title(f"{r['task']} seed {r['seed']}: adjoint energy the shared basis holds")
    axes[1].legend(fontsize=7, ncol=2)
    for o in r["orders"]:
        order = r[str(o)]["hankel_order_1e-2"][:-1]
        axes[2].plot(range(1, len(order)), order[1:], marker=".", label=f"d = {o}")
    axes[2].set_yscale("log", base=2)
    axes[2].set_xlabel("layer l (x_l)")
    axes[2].set_ylabel("Hankel singular values > 1% of the largest")
    axes[2].set_title(f"{r['task']} seed {r['seed']}: order the map uses (= d: saturated)")
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(img, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="hate", choices=sorted(TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", default="4,8,16,32,64,128,256")
    ap.add_argument("--sizes", default="400,200,200", help="concept,operating,eval per class")
    ap.add_argument("--data-dir", default=str(C.DEFAULT_DATA))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    log = lambda m: print(m, flush=True)
    img = ROOT / "docs" / "img" / "early_layers.png"
    if not args.plot_only:
        torch.set_num_threads(args.threads)
        orders = sorted({int(x) for x in args.orders.split(",")})
        res = run(args.task, args.seed, orders, args.sizes, args.data_dir, log)
        res["command"] = (
            f"python benchmarks/early_layers.py --task {args.task} --seed {args.seed} "
            f"--orders {args.orders} --sizes {args.sizes}"
        )
        out = RESULTS / f"early_layers_{args.task}_seed{args.seed}.json"
        out.write_text(json.dumps(res, indent=1))
        log(f"wrote {out}")
    paths = sorted(RESULTS.glob("early_layers_*_seed*.json"))
    if paths:
        plot(paths, img)
        log(f"wrote {img}")


if __name__ == "__main__":
    main()
