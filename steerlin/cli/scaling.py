"""`steerlin scaling`: fidelity against model size."""

from __future__ import annotations

import argparse
import gc
import time

from ..errors import InputError
from ..report import columns
from .common import Run, _csv, seam
from .options import _basis, _data, _sizes
from .steps import _dtype, _encode_splits, _fidelity, _splits


def _orders(text, n_layers: int) -> list[int]:
    """'1,2,L+1' -> [1, 2, n_layers + 1] (sorted, unique, positive)."""
    out = set()
    for tok in str(text).split(","):
        tok = tok.strip().replace(" ", "")
        if not tok:
            continue
        if tok in ("L+1", "l+1"):
            out.add(n_layers + 1)
            continue
        try:
            v = int(tok)
        except ValueError:
            raise InputError(f"--d: expected integers or 'L+1', got {tok!r}") from None
        if v < 1:
            raise InputError(f"--d: orders must be >= 1, got {v}")
        out.add(v)
    if not out:
        raise InputError("--d: no orders given")
    return sorted(out)


def cmd_scaling(args) -> int:
    from .. import plots

    run = Run(args, "scaling", "steerlin-scaling")
    names = _csv(args.models, what="--models")
    with run.timed("data"):
        task, splits = _splits(args, args.task, args.n_concept, args.n_operating, args.n_eval)
    rows = []
    for name in names:
        print(f"\n=== model {name} ===", flush=True)
        t = time.perf_counter()
        try:
            model = seam("resolve_model")(
                name, device=args.device, dtype=_dtype(args), cache_dir=args.cache_dir
            )
        except Exception as exc:  # noqa: BLE001 - any load failure becomes a row
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name}: failed to load ({type(exc).__name__}: {exc})", flush=True)
            continue
        run.timings[f"{name}/load"] = time.perf_counter() - t
        params = sum(p.numel() for p in model.parameters())
        try:
            ds = _orders(args.d, model.cfg.n_layers)
            margs = argparse.Namespace(**{**vars(args), "d": ds})
            with run.timed(f"{name}/fidelity"):
                tr = _fidelity(
                    margs, model, _encode_splits(model, splits), task.name, readouts=("concept",)
                )
            for r in tr.table():
                rows.append(
                    {
                        "model": name,
                        "params": params,
                        "n_layers": model.cfg.n_layers,
                        "d_model": model.cfg.d_model,
                        **r,
                    }
                )
        except Exception as exc:  # noqa: BLE001 - one bad model must not end the sweep
            rows.append({"model": name, "params": params, "error": f"{type(exc).__name__}: {exc}"})
        del model
        gc.collect()
    run.table(
        f"Fidelity vs model size and order d ({task.name}, basis {args.basis}; reduction = "
        "vs exact gains on the operating prompts, end-to-end = vs the ±ε scan on the eval "
        "split, beside the ceiling 'exact (operating)')",
        rows,
        columns("model params n_layers d variant")
        + [
            ("red_raw_spearman", "reduction: Spearman raw", ".3f"),
            ("red_rel_err_median", "reduction: rel. err. median", ".3f"),
            ("red_null_identity_raw_spearman", "null identity, raw", ".3f"),
            ("e2e_raw_spearman", "end-to-end: Spearman raw", ".3f"),
            ("e2e_null_identity_raw_spearman", "e2e null identity, raw", ".3f"),
            ("e2e_spearman", "e2e Spearman norm-rel.", ".3f"),
            ("e2e_null_scale_spearman", "e2e null scale, norm-rel.", ".3f"),
        ]
        + columns("error"),
    )
    per_prompt = [r for r in rows if r.get("variant") == "per-prompt"]
    if per_prompt:
        plots.plot_fidelity_vs_d(
            per_prompt,
            run.path("scaling.png"),
            title=f"Reduction error vs d per model ({task.name}, basis {args.basis}, raw units)",
        )
    return run.finish(rows=rows)


def register(add) -> None:
    p = add("scaling", cmd_scaling, "fidelity against model size")
    p.add_argument("--models", required=True, help="comma-separated model names")
    p.add_argument("--task", default="sst2", help="task (default: sst2)")
    _data(p)
    _sizes(p)
    p.add_argument(
        "--d",
        default="1,2,4,8,12,16,L+1",
        help="orders to sweep, comma list; 'L+1' is each model's n_layers + 1, where the mean "
        "model is realised exactly (default: 1,2,4,8,12,16,L+1)",
    )
    _basis(p)
    p.add_argument("--eps", type=float, default=0.1, help="scan step ε (default: 0.1)")
