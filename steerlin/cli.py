"""The `steerlin` command: demo, fit, scan, control, generate, reproduce, scaling, ablate.

Every subcommand writes `results.json` (every number, the configuration, versions and
timings) and `results.md` (the same as markdown tables) into its output folder, plus its
files and figures. An existing non-empty output folder is never overwritten silently: the
run goes to `DIR-1`, `DIR-2`, ... instead (and says so), unless `--overwrite` is given.

Models are resolved by `resolve_model`, tasks by `resolve_task` and text prompts turned into
model inputs by `encode_prompts`: three module-level seams that tests replace (a tiny random
model with token-id prompts) without any special model names in the command line.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SteerlinError

DEFAULT_MODEL = "gemma-3-270m"
DATA_ENV = "STEERLIN_DATA_DIR"
DEMO_TASKS = ("demo", "sst2-demo")
DEMO_PROMPTS = ("The movie was", "I think this film")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class CliError(SteerlinError):
    """A command-line usage problem (bad option value, missing file from an earlier step)."""


# =============================================================================================
# seams: model, task and prompt resolution (tests replace these)
# =============================================================================================


def resolve_model(
    name: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
):
    """The HookedTransformer for a model name (steerlin.models.load_model)."""
    from .models import load_model

    return load_model(name, device=device, dtype=dtype, cache_dir=cache_dir)


def resolve_task(name: str, *, data_dir: str | None = None, template: str = "{text}"):
    """A Task: "demo" is the SST-2 sample shipped with steerlin, anything else goes to
    steerlin.load_task (local copy in `data_dir`, else Hugging Face)."""
    from .data import load_demo_task, load_task

    if name.strip().lower() in DEMO_TASKS:
        return load_demo_task(template)
    return load_task(name, data_dir=data_dir, template=template)


def encode_prompts(model, texts: Sequence[str]) -> list:
    """Model inputs for text prompts: the texts themselves (the library tokenizes them)."""
    return list(texts)


# =============================================================================================
# output folders, results files, tables
# =============================================================================================


def prepare_out(path: str | Path, *, overwrite: bool = False, say=print) -> Path:
    """The folder to write into: `path`, or `path-1`, `path-2`, ... if it exists non-empty.

    With `overwrite`, `path` is reused as is (files of the same name are replaced).
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise CliError(f"--out: {str(p)!r} exists and is not a folder")

    def free(q: Path) -> bool:
        return not q.exists() or (q.is_dir() and not any(q.iterdir()))

    if overwrite or free(p):
        p.mkdir(parents=True, exist_ok=True)
        return p
    i = 1
    while not free(p.with_name(f"{p.name}-{i}")):
        i += 1
    q = p.with_name(f"{p.name}-{i}")
    q.mkdir(parents=True, exist_ok=True)
    say(f"note: {p} exists and is not empty; writing to {q} instead (--overwrite to reuse it)")
    return q


def jsonable(obj: Any) -> Any:
    """Plain JSON types: tensors/arrays to lists, non-finite floats to "inf"/"-inf"/"nan"."""
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, (list, tuple)):
        return _layers_str(v)
    try:
        return format(v, spec) if spec else str(v)
    except (TypeError, ValueError):
        return str(v)


def md_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(_fmt(r.get(k), f).replace("|", "\\|") for k, _, f in columns) + " |"
        for r in rows
    ]
    return "\n".join([head, sep, *body])


def _fidelity(args, model, enc, task: str, *, readouts=("concept",), label_words=None):
    """run_fidelity with the CLI's shared settings (Krylov basis, --d, --eps, --batch-size...)."""
    from .experiments import run_fidelity

    return run_fidelity(
        model,
        enc,
        task=task,
        d=args.d,
        bases=("krylov",),
        readouts=readouts,
        eps=args.eps,
        label_words=label_words,
        batch_size=args.batch_size,
        seed=args.seed,
        exact=True,
        progress=args.progress,
    )


def _layers_str(layers: Iterable[int]) -> str:
    """[2, 3, 4, 7] -> "2-4,7"."""
    xs = sorted(int(x) for x in layers)
    if not xs:
        return "-"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)


def parse_layers(text: str | None, n_layers: int | None = None) -> list[int] | None:
    """ "2-17" or "0,3,5" or "2-5,9" -> sorted layer list (None stays None)."""
    if text is None:
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise CliError(f"--layers: expected e.g. '2-17' or '0,3,5', got {text!r}") from None
    if not out:
        raise CliError(f"--layers: no layers in {text!r}")
    if n_layers is not None and max(out) >= n_layers:
        raise CliError(f"--layers: the model has layers 0..{n_layers - 1}, got {max(out)}")
    return sorted(out)


def _csv(text: str, conv: Callable = str, what: str = "list") -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CliError(f"{what}: expected a comma-separated list, got {text!r}")
    try:
        return [conv(t) for t in items]
    except ValueError:
        raise CliError(f"{what}: could not read {text!r}") from None


FIDELITY_COLUMNS = [
    ("task", "task", ""),
    ("readout", "readout", ""),
    ("basis", "basis", ""),
    ("d", "d", ""),
    ("variant", "gains", ""),
    ("spearman", "Spearman", ".3f"),
    ("pearson", "Pearson", ".3f"),
]
ENERGY_COLUMNS = [
    ("strategy", "strategy", ""),
    ("layers", "layers", ""),
    ("energy", "energy Σu²", ".4g"),
    ("ratio_to_llv", "ratio to LLV", ".3g"),
    ("raw_energy", "raw energy", ".4g"),
    ("measured_shift", "measured shift", ".4g"),
    ("multiplier", "multiplier", ".4g"),
    ("evaluations", "evals", ""),
]


class Run:
    """One command's output folder, timings, numbers and markdown; `finish()` writes both
    results files."""

    def __init__(self, args: argparse.Namespace, command: str, default_out: str | Path):
        self.command = command
        self.out = prepare_out(args.out or default_out, overwrite=args.overwrite)
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self.config = {k: v for k, v in vars(args).items() if k != "func"}
        self.md: list[str] = [f"# steerlin {command}\n"]
        print(f"steerlin {command}: writing to {self.out}/")

    def timed(self, name: str):
        run = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                run.timings[name] = run.timings.get(name, 0.0) + time.perf_counter() - self.t

        return _T()

    def say(self, text: str = "", *, md: bool = True) -> None:
        print(text, flush=True)
        if md:
            self.md.append(text + "\n")

    def table(self, title: str, rows: Sequence[dict], columns) -> str:
        text = md_table(rows, columns)
        print(f"\n## {title}\n\n{text}\n", flush=True)
        self.md.append(f"## {title}\n\n{text}\n")
        return text

    def path(self, name: str) -> Path:
        return self.out / name

    def finish(self) -> Path:
        from .experiments import versions

        self.timings["total"] = time.perf_counter() - self.t0
        doc = {
            "command": self.command,
            "config": self.config,
            "versions": versions(),
            "timings": self.timings,
            "results": self.results,
        }
        self.path("results.json").write_text(json.dumps(jsonable(doc), indent=2) + "\n")
        times = [{"step": k, "seconds": v} for k, v in self.timings.items()]
        self.md.append(
            "## Timings\n\n"
            + md_table(times, [("step", "step", ""), ("seconds", "seconds", ".1f")])
        )
        self.path("results.md").write_text("\n".join(self.md) + "\n")
        print(
            f"\nwrote {self.path('results.json')} and results.md "
            f"({self.timings['total']:.1f} s in total)"
        )
        return self.out


# =============================================================================================
# shared pieces
# =============================================================================================


def _dtype(args, recorded: str | None = None) -> torch.dtype:
    name = args.dtype or recorded or "float32"
    return DTYPES[name]


def _load_model(args, run: Run | None = None, recorded: dict | None = None):
    """The model named by --model, else the one recorded by an earlier step, else the default."""
    recorded = recorded or {}
    name = args.model or recorded.get("model") or DEFAULT_MODEL
    dtype = _dtype(args, recorded.get("dtype"))
    cache = args.cache_dir or recorded.get("cache_dir")
    print(
        f"loading model {name} ({str(dtype).removeprefix('torch.')}, {args.device})...", flush=True
    )
    t = time.perf_counter()
    model = resolve_model(name, device=args.device, dtype=dtype, cache_dir=cache)
    if run is not None:
        run.timings["load_model"] = time.perf_counter() - t
        run.config.update(model=name, dtype=str(dtype).removeprefix("torch."))
    return model


def _data_dir(args) -> str | None:
    return getattr(args, "data_dir", None) or os.environ.get(DATA_ENV) or None


def _splits(args, task_name: str, n_concept: int, n_operating: int, n_eval: int):
    task = resolve_task(task_name, data_dir=_data_dir(args), template=args.template)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        splits = task.split(n_concept, n_operating, n_eval, seed=args.seed)
    return task, splits


def _label_words(args, task) -> tuple[str, str]:
    if getattr(args, "label_words", None):
        words = args.label_words.split(",")
        if len(words) != 2:
            raise CliError(f"--label-words: expected 'POS,NEG', got {args.label_words!r}")
        return words[0], words[1]
    return task.spec.positive_label_word, task.spec.negative_label_word


def _check_logits(model, words) -> str | None:
    """None if the logit readout works with these label words, else the reason it does not."""
    from .jacobians import make_readout

    try:
        make_readout(model, "logits", None, label_words=list(words))
    except SteerlinError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class _Prompts:
    """Model-ready prompts with labels (token ids for tokenizer-less models)."""

    texts: list
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class _EncodedSplits:
    concept: _Prompts
    operating: _Prompts
    eval: _Prompts


def _encode_splits(model, splits) -> _EncodedSplits:
    enc = {
        name: _Prompts(encode_prompts(model, list(p.texts)), tuple(p.labels))
        for name, p in (
            ("concept", splits.concept),
            ("operating", splits.operating),
            ("eval", splits.eval),
        )
    }
    return _EncodedSplits(**enc)


def _separation(
    model,
    prompts,
    labels,
    directions,
    *,
    readout="concept",
    label_words=None,
    batch_size=16,
    progress=False,
) -> dict[str, float]:
    """Class means of the readout on clean prompts, and half their difference (the default
    target): 0.5 * (mean y | label 1 - mean y | label 0)."""
    from .jacobians import make_readout
    from .trajectory import capture

    traj = capture(model, prompts, batch_size=batch_size, progress=progress)
    rd = make_readout(model, readout, directions.unit[-1], label_words=label_words)
    y = rd(model, traj.states[:, -1]).to(torch.float64)
    lab = torch.as_tensor(list(labels))
    m1, m0 = float(y[lab == 1].mean()), float(y[lab == 0].mean())
    return {
        "mean_label1": m1,
        "mean_label0": m0,
        "separation": m1 - m0,
        "half_separation": 0.5 * (m1 - m0),
    }


def _fidelity_rows(task, readout, basis, d, predicted: dict, measured, exact=None) -> list[dict]:
    from .evaluate import fidelity

    rows = []
    for variant, g in predicted.items():
        f = fidelity(g, measured)
        rows.append(
            dict(
                task=task,
                readout=readout,
                basis=basis,
                d=d,
                variant=variant,
                spearman=f.spearman,
                pearson=f.pearson,
            )
        )
    if exact is not None:
        f = fidelity(exact, measured)
        rows.append(
            dict(
                task=task,
                readout=readout,
                basis="-",
                d=None,
                variant="exact_gains",
                spearman=f.spearman,
                pearson=f.pearson,
            )
        )
    return rows


def _calibrated_schedules(ctrl, rows) -> dict[str, torch.Tensor]:
    """Calibrated amplitudes of every strategy that reached the target (for plot_schedule)."""
    out = {}
    for r in rows:
        name = r["strategy"]
        mult = r.get("multiplier", math.nan)
        if not math.isfinite(mult) or name.startswith("random ("):
            continue
        if name == "llv":
            s = ctrl.schedule
        elif name.startswith("random:"):
            s = ctrl.baseline(f"single:{name.split(':')[1]}")
        else:
            s = ctrl.baseline(name)
        out[name] = s.amplitudes * mult
    return out


def _energy(run: Run, model, prompts, surrogate, target, args, *, label: str = "") -> list[dict]:
    """compare_energy with a message and timing; rows as returned."""
    from .evaluate import compare_energy

    baselines = _csv(args.baselines, what="--baselines") if args.baselines else []
    n = (
        1
        + len([b for b in baselines if b != "random"])
        + (args.n_random if "random" in baselines else 0)
    )
    print(
        f"calibrating {n} schedules{label} on the full model by bisection "
        f"(target shift {target:+.4g})...",
        flush=True,
    )
    with run.timed("energy" + (f"/{label.strip()}" if label else "")):
        rows = compare_energy(
            model,
            prompts,
            surrogate,
            target,
            baselines=baselines,
            n_random=args.n_random,
            layers=parse_layers(getattr(args, "layers", None), surrogate.n_layers),
            batch_size=args.batch_size,
            seed=args.seed,
        )
    return rows


def _generate(model, prompts: Sequence[str], max_new_tokens: int, schedule=None) -> list[str]:
    """Greedy continuations (prompt removed), steered by `schedule` if given.

    All prompts go through one left-padded batch (same tokens as one at a time; the steering
    hooks add at the last prompt position and at every generated token).
    """
    from contextlib import nullcontext

    ctx = schedule.apply(model) if schedule is not None else nullcontext()
    with ctx, torch.no_grad():
        texts = model.generate(
            list(prompts),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            verbose=False,
            use_past_kv_cache=True,
            padding_side="left",
        )
    texts = [texts] if isinstance(texts, str) else list(texts)
    return [t[len(p) :] if t.startswith(p) else t for p, t in zip(prompts, texts, strict=True)]


def _subset(prompts: _Prompts, n_per_class: int | None) -> _Prompts:
    """The first n_per_class prompts of each class (all of them for None)."""
    if n_per_class is None:
        return prompts
    keep, seen = [], {0: 0, 1: 0}
    for i, y in enumerate(prompts.labels):
        if seen[y] < n_per_class:
            keep.append(i)
            seen[y] += 1
    return _Prompts([prompts.texts[i] for i in keep], tuple(prompts.labels[i] for i in keep))


def _generation_table(run: Run, prompts, plain, steered, title: str) -> list[dict]:
    rows = [
        {
            "prompt": p,
            "unsteered": a.replace("\n", " ").strip(),
            "steered": b.replace("\n", " ").strip(),
        }
        for p, a, b in zip(prompts, plain, steered, strict=True)
    ]
    for r in rows:
        print(
            f"\nprompt   : {r['prompt']}\nunsteered: …{r['unsteered']}\nsteered  : …{r['steered']}"
        )
    run.md.append(
        f"## {title}\n\n"
        + md_table(
            rows,
            [("prompt", "prompt", ""), ("unsteered", "unsteered", ""), ("steered", "steered", "")],
        )
        + "\n"
    )
    return rows


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CliError(f"{what}: {str(path)!r} not found")
    return json.loads(path.read_text())


def _fit_record(fit_dir: str | Path) -> tuple[Path, dict, dict]:
    """(folder, results.json config, splits.json) of a `steerlin fit` output folder."""
    d = Path(fit_dir).expanduser()
    if not d.is_dir():
        raise CliError(f"--fit-dir: {str(d)!r} is not a folder (run `steerlin fit` first)")
    for f in ("directions.safetensors", "surrogate.safetensors", "splits.json"):
        if not (d / f).is_file():
            raise CliError(f"--fit-dir: {str(d)!r} lacks {f}; is it a `steerlin fit` output?")
    res = _read_json(d / "results.json", "--fit-dir") if (d / "results.json").is_file() else {}
    return d, res.get("config", {}), _read_json(d / "splits.json", "--fit-dir")


def _readout_args(surrogate) -> tuple[str, list[int] | None]:
    rd = surrogate.meta.get("readout", {"kind": "concept"})
    if rd.get("kind") == "logits":
        return "logits", [int(rd["pos_token"]), int(rd["neg_token"])]
    return "concept", None


# =============================================================================================
# subcommands
# =============================================================================================


def cmd_demo(args) -> int:
    """Offline end-to-end tour on Gemma-3-270m and the shipped SST-2 sample."""
    from . import plots
    from .controller import Controller
    from .evaluate import measure_shift

    run = Run(args, "demo", "steerlin-demo")
    model = _load_model(args, run)
    L = model.cfg.n_layers
    with run.timed("data"):
        task, splits = _splits(args, "demo", args.n_concept, args.n_operating, args.n_eval)
    run.say(
        f"Model {run.config['model']} ({L} blocks, d_model {model.cfg.d_model}); task "
        f"{task.name}: {args.n_concept}/{args.n_operating}/{args.n_eval} prompts per class for "
        f"concept/operating/eval (seed {args.seed}); surrogate order d = {args.d}, scan ε = "
        f"{args.eps}."
    )
    enc = _encode_splits(model, splits)
    with run.timed("fidelity"):
        tr = _fidelity(args, model, enc, task.name, readouts=("concept",))
    run.timings.update({f"fidelity/{k}": v for k, v in tr.timings.items()})
    sur = tr.surrogates["krylov/concept"]
    fid = tr.table()
    run.table("Fidelity: predicted vs measured per-layer gains (eval split)", fid, FIDELITY_COLUMNS)
    gain_rows = [
        {
            "layer": l,
            "predicted": float(sur.gains[l]),
            "paper": float(sur.gains_paper[l]),
            "measured": float(tr.measured["concept"][l]),
            "exact": float(tr.exact["concept"][l]),
        }
        for l in range(L)
    ]
    run.table(
        "Per-layer gains dy/du_l (concept readout)",
        gain_rows,
        [
            ("layer", "layer", ""),
            ("predicted", "LLV (per-prompt)", ".4g"),
            ("paper", "LLV (paper)", ".4g"),
            ("measured", "measured ±ε", ".4g"),
            ("exact", "exact", ".4g"),
        ],
    )
    # energy: target and calibrations on the first n_energy eval prompts of each class
    energy_set = _subset(enc.eval, args.n_energy)
    with run.timed("target"):
        sep = _separation(
            model, energy_set.texts, energy_set.labels, tr.directions, batch_size=args.batch_size
        )
    target = args.target_frac * sep["separation"]
    run.say(
        f"\nTarget: {args.target_frac:g} × the class-mean separation of the concept readout "
        f"<unit_L, x_L> on the eval split ({len(energy_set)} prompts): {args.target_frac:g} × "
        f"({sep['mean_label1']:.4g} − {sep['mean_label0']:.4g}) = {target:+.4g}."
    )
    rows = _energy(run, model, energy_set.texts, sur, target, args)
    run.table("Energy to reach the target (calibrated on the full model)", rows, ENERGY_COLUMNS)
    ctrl = Controller(sur, target, seed=args.seed)
    scheds = _calibrated_schedules(ctrl, rows)
    plots.plot_gains(
        sur.gains,
        tr.measured["concept"],
        run.path("gains.png"),
        exact=tr.exact["concept"],
        title=f"{run.config['model']} on {task.name}: per-layer gains (d={args.d})",
    )
    plots.plot_energy(
        rows,
        run.path("energy.png"),
        title=f"Energy to shift the readout by {target:+.3g} ({task.name})",
    )
    plots.plot_schedule(
        {k: v for k, v in scheds.items() if k in ("llv", "uniform", "last")} or scheds,
        run.path("schedule.png"),
        title=f"Calibrated schedules for a shift of {target:+.3g}",
    )
    run.results.update(
        fidelity=fid,
        gains=tr.to_json(),
        target=dict(sep, target=target, target_frac=args.target_frac),
        energy=rows,
        schedules=scheds,
    )
    if not args.no_generate and model.tokenizer is not None:
        llv = rows[0]
        if not math.isfinite(llv.get("multiplier", math.nan)):
            run.say("\nThe LLV schedule could not be calibrated; no generation.")
        else:
            k = args.steer_scale
            cal = ctrl.schedule.scaled(llv["multiplier"])
            gen_sched = cal.scaled(-k, strategy="llv (generation)")
            with run.timed("measure_generation_shift"):
                shift = float(
                    measure_shift(model, energy_set.texts, gen_sched, batch_size=args.batch_size)[0]
                )
            run.say(
                f"\nGeneration: greedy, {args.max_new_tokens} new tokens, steered toward the "
                f"NEGATIVE pole with the calibrated LLV schedule scaled by {-k:g} (linear target "
                f"{-k * target:+.4g}: {k:g}× the calibrated target, for a visible effect; the "
                f"full model's measured readout shift with it is {shift:+.4g}, energy Σu² = "
                f"{gen_sched.energy:.4g}, largest |u_l| = "
                f"{float(gen_sched.amplitudes.abs().max()):.3g})."
            )
            prompts = args.prompt or list(DEMO_PROMPTS)
            with run.timed("generate"):
                plain = _generate(model, prompts, args.max_new_tokens)
                steered = _generate(model, prompts, args.max_new_tokens, gen_sched)
            run.results["generation"] = {
                "scale": -k,
                "target": -k * target,
                "measured_shift": shift,
                "energy": gen_sched.energy,
                "samples": _generation_table(
                    run, prompts, plain, steered, "Steered (toward negative) vs unsteered"
                ),
            }
            gen_sched.save(run.path("schedule_generation.safetensors"))
    cal_llv = rows[0]
    if math.isfinite(cal_llv.get("multiplier", math.nan)):
        ctrl.schedule.scaled(cal_llv["multiplier"], calibrated=True).save(
            run.path("schedule.safetensors")
        )
    tr.directions.save(run.path("directions.safetensors"))
    sur.save(run.path("surrogate.safetensors"))
    run.say("\nFigures: gains.png, energy.png, schedule.png")
    run.finish()
    return 0


def cmd_fit(args) -> int:
    from .directions import ConceptDirections
    from .surrogate import Surrogate
    from .trajectory import capture

    run = Run(args, "fit", "steerlin-fit")
    model = _load_model(args, run)
    with run.timed("data"):
        task, splits = _splits(args, args.task, args.n_concept, args.n_operating, args.n_eval)
    enc = _encode_splits(model, splits)
    lw = list(_label_words(args, task)) if args.readout == "logits" else None
    if lw is not None and (why := _check_logits(model, lw)):
        raise CliError(f"--readout logits: {why}; pass --label-words ' yes, no' (single tokens)")
    run.config.update(task_name=task.name, label_words=lw, data_source=task.source)
    with run.timed("directions"):
        traj = capture(model, enc.concept.texts, batch_size=args.batch_size, progress=args.progress)
        dirs = ConceptDirections.fit(model, traj, list(enc.concept.labels))
    with run.timed("surrogate"):
        sur = Surrogate.fit(
            model,
            enc.operating.texts,
            dirs,
            d=args.d,
            basis=args.basis,
            readout=args.readout,
            variant=args.variant,
            label_words=lw,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=args.progress,
        )
    with run.timed("separation"):
        sep = _separation(
            model,
            enc.eval.texts,
            enc.eval.labels,
            dirs,
            readout=args.readout,
            label_words=lw,
            batch_size=args.batch_size,
        )
    dirs.save(run.path("directions.safetensors"))
    sur.save(run.path("surrogate.safetensors"))
    run.path("splits.json").write_text(
        json.dumps(
            {
                "task": task.name,
                "template": args.template,
                "seed": args.seed,
                **{
                    name: {"texts": list(p.texts), "labels": list(p.labels)}
                    for name, p in splits.items()
                },
            },
            indent=1,
        )
        + "\n"
    )
    run.say(
        f"Fitted {sur!r} on {len(enc.operating)} operating prompts of {task.name}; "
        f"directions on {len(enc.concept)} concept prompts."
    )
    rows = [
        {
            "layer": l,
            "gain": float(sur.gains[l]),
            "paper": float(sur.gains_paper[l]),
            "std": float(sur.gains_std[l]),
            "scale": float(dirs.scale[l]),
        }
        for l in range(sur.n_layers)
    ]
    run.table(
        f"Predicted gains dy/du_l ({args.readout} readout, {args.variant})",
        rows,
        [
            ("layer", "layer", ""),
            ("gain", "gain", ".4g"),
            ("paper", "paper variant", ".4g"),
            ("std", "per-prompt std", ".3g"),
            ("scale", "scale ‖x_l‖", ".4g"),
        ],
    )
    run.say(
        f"\nReadout class-mean separation on the eval split: {sep['separation']:+.4g} "
        f"(half of it, {sep['half_separation']:+.4g}, is a natural `control --target`)."
    )
    run.results.update(
        gains=sur.gains,
        gains_paper=sur.gains_paper,
        gains_std=sur.gains_std,
        scale=dirs.scale,
        separation=sep,
        surrogate=repr(sur),
    )
    run.finish()
    return 0


def cmd_scan(args) -> int:
    from . import plots
    from .directions import ConceptDirections
    from .evaluate import exact_gains, scan_gains
    from .surrogate import Surrogate

    fit_dir, cfg, split_rec = _fit_record(args.fit_dir)
    run = Run(args, "scan", fit_dir / "scan")
    model = _load_model(args, run, cfg)
    dirs = ConceptDirections.load(fit_dir / "directions.safetensors", model)
    sur = Surrogate.load(fit_dir / "surrogate.safetensors", model)
    kind, lw = _readout_args(sur)
    ev = encode_prompts(model, split_rec["eval"]["texts"])
    with run.timed("scan"):
        measured = scan_gains(
            model,
            ev,
            dirs,
            eps=args.eps,
            readout=kind,
            label_words=lw,
            method=args.method,
            batch_size=args.batch_size,
            progress=args.progress,
        )
    exact = None
    if not args.no_exact:
        with run.timed("exact"):
            exact = exact_gains(
                model,
                ev,
                dirs,
                readout=kind,
                label_words=lw,
                batch_size=args.batch_size,
                progress=args.progress,
            )
    fid = _fidelity_rows(
        split_rec.get("task"),
        kind,
        sur.meta.get("basis"),
        sur.d,
        {sur.variant: sur.gains, **({"paper": sur.gains_paper} if sur.variant != "paper" else {})},
        measured,
        exact,
    )
    run.say(f"Full-model gains on {len(ev)} eval prompts ({args.method} scan, ε = {args.eps}).")
    run.table("Fidelity: surrogate vs measured gains", fid, FIDELITY_COLUMNS)
    rows = [
        {
            "layer": l,
            "predicted": float(sur.gains[l]),
            "measured": float(measured[l]),
            "exact": None if exact is None else float(exact[l]),
        }
        for l in range(sur.n_layers)
    ]
    run.table(
        "Per-layer gains",
        rows,
        [
            ("layer", "layer", ""),
            ("predicted", "LLV", ".4g"),
            ("measured", "measured ±ε", ".4g"),
            ("exact", "exact", ".4g"),
        ],
    )
    plots.plot_gains(
        sur.gains,
        measured,
        run.path("gains.png"),
        exact=exact,
        title=f"{cfg.get('model', run.config['model'])} on "
        f"{split_rec.get('task')}: gains (d={sur.d}, {kind} readout)",
    )
    run.results.update(
        fidelity=fid,
        measured=measured,
        exact=exact,
        predicted=sur.gains,
        predicted_paper=sur.gains_paper,
        fit_dir=fit_dir,
    )
    run.finish()
    return 0


def cmd_control(args) -> int:
    from . import plots
    from .controller import Controller
    from .surrogate import Surrogate

    fit_dir, cfg, split_rec = _fit_record(args.fit_dir)
    run = Run(args, "control", fit_dir / "control")
    sur = Surrogate.load(fit_dir / "surrogate.safetensors")
    L = sur.n_layers
    layers = parse_layers(args.layers, L)
    if args.llama_cpp and layers is None:
        layers = list(range(2, L))
        args.layers = f"2-{L - 1}"
        run.say(
            f"--llama-cpp: restricting the schedule to layers 2-{L - 1} (llama.cpp control "
            "vectors cannot express injections at blocks 0 and 1)."
        )
    target = args.target
    if target is None:
        fit_res = _read_json(fit_dir / "results.json", "--fit-dir")["results"]
        target = float(fit_res["separation"]["half_separation"])
        run.say(
            f"No --target: using half the readout's class-mean separation recorded by fit, "
            f"{target:+.4g}."
        )
    run.config.update(target=target, layers=layers, model=cfg.get("model"), dtype=cfg.get("dtype"))
    ctrl = Controller(sur, target, layers=layers, seed=args.seed)
    baselines = _csv(args.baselines, what="--baselines") if args.baselines else []
    if args.calibrate:
        model = _load_model(args, run, cfg)
        ev = encode_prompts(model, split_rec["eval"]["texts"])
        rows = _energy(run, model, ev, sur, target, args)
        scheds = _calibrated_schedules(ctrl, rows)
        llv = rows[0]
        if not math.isfinite(llv.get("multiplier", math.nan)):
            raise CliError(f"calibration of the LLV schedule failed: {llv.get('error')}")
        schedule = ctrl.schedule.scaled(llv["multiplier"], calibrated=True)
        run.table(
            f"Energy to reach {target:+.4g} (calibrated on the full model)", rows, ENERGY_COLUMNS
        )
        plots.plot_energy(
            rows, run.path("energy.png"), title=f"Energy to shift the readout by {target:+.3g}"
        )
    else:
        plans = [("llv", ctrl.schedule)]
        for kind in baselines:
            try:
                s = ctrl.baseline(kind)
            except SteerlinError as exc:
                run.say(f"baseline {kind!r} skipped: {exc}")
                continue
            plans.append((s.strategy, s))
        e0 = plans[0][1].energy
        rows = [
            {
                "strategy": n,
                "layers": s.layers,
                "energy": s.energy,
                "ratio_to_llv": s.energy / e0,
                "raw_energy": s.raw_energy,
                "predicted_shift": s.predicted_shift,
            }
            for n, s in plans
        ]
        scheds = {n: s.amplitudes for n, s in plans}
        schedule = ctrl.schedule
        run.table(
            f"Energy to reach {target:+.4g} under the surrogate (not calibrated; "
            "--calibrate checks it on the full model)",
            rows,
            [
                ("strategy", "strategy", ""),
                ("layers", "layers", ""),
                ("energy", "energy Σu²", ".4g"),
                ("ratio_to_llv", "ratio to LLV", ".3g"),
                ("raw_energy", "raw energy", ".4g"),
                ("predicted_shift", "predicted shift", ".4g"),
            ],
        )
    schedule.save(run.path("schedule.safetensors"))
    amp = [{"layer": l, "u": float(schedule.amplitudes[l])} for l in range(L)]
    run.table(
        "LLV schedule amplitudes (norm-relative)",
        amp,
        [("layer", "layer", ""), ("u", "u_l", ".4g")],
    )
    plots.plot_schedule(
        scheds,
        run.path("schedule.png"),
        title=f"Schedules for a shift of {target:+.3g}"
        + (" (calibrated)" if args.calibrate else " (surrogate-sized)"),
    )
    if args.llama_cpp:
        p = schedule.to_llama_cpp(args.llama_cpp)
        run.say(f"\nllama.cpp control vector: {p} (use: llama-cli --control-vector {p})")
    run.say(f"\nSchedule: {run.path('schedule.safetensors')} — {schedule!r}")
    run.results.update(
        energy=rows,
        schedule=schedule.amplitudes,
        schedules=scheds,
        schedule_meta=schedule.meta,
        fit_dir=fit_dir,
    )
    run.finish()
    return 0


def cmd_generate(args) -> int:
    from .controller import Schedule

    sched_path = Path(args.schedule).expanduser()
    recorded: dict = {}
    for cand in (sched_path.parent / "results.json", sched_path.parent.parent / "results.json"):
        if cand.is_file():
            recorded = json.loads(cand.read_text()).get("config", {})
            if recorded.get("model"):
                break
    run = Run(args, "generate", sched_path.parent / "generate")
    model = _load_model(args, run, recorded)
    if model.tokenizer is None:
        raise CliError("generate: the model has no tokenizer; text generation needs one")
    schedule = Schedule.load(sched_path, model)
    steer = schedule.scaled(args.scale) if args.scale != 1.0 else schedule
    prompts = args.prompt or list(DEMO_PROMPTS)
    run.say(f"Schedule {sched_path} × {args.scale:g}: {steer!r}")
    with run.timed("generate"):
        plain = _generate(model, prompts, args.max_new_tokens)
        steered = _generate(model, prompts, args.max_new_tokens, steer)
    rows = _generation_table(
        run, prompts, plain, steered, f"Steered (× {args.scale:g}) vs unsteered, greedy"
    )
    run.results.update(
        samples=rows, scale=args.scale, energy=steer.energy, schedule=str(sched_path)
    )
    run.finish()
    return 0


def cmd_reproduce(args) -> int:
    from . import plots

    run = Run(args, "reproduce", "steerlin-reproduce")
    model = _load_model(args, run)
    tasks = _csv(args.tasks, what="--tasks")
    all_fid, all_energy, per_task = [], [], {}
    for name in tasks:
        print(f"\n=== task {name} ===", flush=True)
        with run.timed(f"{name}/data"):
            task, splits = _splits(args, name, args.n_concept, args.n_operating, args.n_eval)
        enc = _encode_splits(model, splits)
        lw = _label_words(args, task)
        readouts = ["concept"]
        note = _check_logits(model, lw)
        if note is None:
            readouts.append("logits")
        else:
            run.say(f"{name}: logit readout skipped ({note})")
        with run.timed(f"{name}/fidelity"):
            tr = _fidelity(args, model, enc, name, readouts=readouts, label_words=lw)
        fid = tr.table()
        all_fid += fid
        tag = re.sub(r"[^\w.-]+", "_", name)
        for rd in readouts:
            s = tr.surrogates[f"krylov/{rd}"]
            suffix = "" if rd == "concept" else f"_{rd}"
            plots.plot_gains(
                s.gains,
                tr.measured[rd],
                run.path(f"gains_{tag}{suffix}.png"),
                exact=tr.exact.get(rd),
                title=f"{run.config['model']} on {name}: {rd} readout (d={args.d})",
            )
        rec = tr.to_json()
        if not args.no_energy:
            sur = tr.surrogates["krylov/concept"]
            eset = _subset(enc.eval, args.n_energy)
            sep = _separation(
                model, eset.texts, eset.labels, tr.directions, batch_size=args.batch_size
            )
            target = args.target_frac * sep["separation"]
            rows = _energy(run, model, eset.texts, sur, target, args, label=f" for {name}")
            for r in rows:
                r["task"] = name
                r["target"] = target
            all_energy += rows
            plots.plot_energy(
                rows,
                run.path(f"energy_{tag}.png"),
                title=f"{name}: energy to shift the concept readout by {target:+.3g}",
            )
            rec.update(energy=rows, target=dict(sep, target=target))
        per_task[name] = rec
        run.results["tasks"] = per_task  # keep partial results if a later task fails
    run.say(
        f"Paper sizes are 400/200/200 per class; this run: {args.n_concept}/"
        f"{args.n_operating}/{args.n_eval}, d = {args.d}, ε = {args.eps}."
    )
    run.table(
        "Fidelity per task (predicted vs measured per-layer gains, eval split)",
        all_fid,
        FIDELITY_COLUMNS,
    )
    if all_energy:
        run.table(
            "Energy per task (calibrated; target = "
            f"{args.target_frac:g} × class-mean separation of the concept readout)",
            all_energy,
            [("task", "task", ""), ("target", "target", ".4g")] + ENERGY_COLUMNS,
        )
    run.results.update(fidelity=all_fid, energy=all_energy)
    run.finish()
    return 0


def cmd_scaling(args) -> int:
    from . import plots

    run = Run(args, "scaling", "steerlin-scaling")
    names = _csv(args.models, what="--models")
    with run.timed("data"):
        task, splits = _splits(args, args.task, args.n_concept, args.n_operating, args.n_eval)
    rows = []
    for name in names:
        print(f"\n=== model {name} ===", flush=True)
        t = time.perf_counter()
        try:
            model = resolve_model(
                name, device=args.device, dtype=_dtype(args), cache_dir=args.cache_dir
            )
        except Exception as exc:  # noqa: BLE001 - any load failure becomes a row
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name}: failed to load ({type(exc).__name__}: {exc})", flush=True)
            continue
        run.timings[f"{name}/load"] = time.perf_counter() - t
        params = sum(p.numel() for p in model.parameters())
        try:
            with run.timed(f"{name}/fidelity"):
                tr = _fidelity(
                    args, model, _encode_splits(model, splits), task.name, readouts=("concept",)
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
        f"Fidelity vs model size ({task.name}, d = {args.d})",
        rows,
        [
            ("model", "model", ""),
            ("params", "params", ",d"),
            ("n_layers", "L", ""),
            ("d_model", "d_model", ""),
            ("variant", "gains", ""),
            ("spearman", "Spearman", ".3f"),
            ("pearson", "Pearson", ".3f"),
            ("error", "error", ""),
        ],
    )
    plot_rows = [r for r in rows if r.get("error") or r.get("variant") == "per-prompt"]
    plots.plot_scaling(
        plot_rows,
        run.path("scaling.png"),
        title=f"Surrogate fidelity vs model size ({task.name}, d={args.d})",
    )
    run.results.update(rows=rows)
    run.finish()
    return 0


def cmd_ablate(args) -> int:
    from . import plots
    from .directions import ConceptDirections
    from .evaluate import exact_gains, fidelity, scan_gains
    from .surrogate import Surrogate

    run = Run(args, "ablate", "steerlin-ablate")
    model = _load_model(args, run)
    ds = _csv(args.d, int, "--d")
    epss = _csv(args.eps, float, "--eps")
    bases = _csv(args.basis, what="--basis")
    with run.timed("data"):
        task, splits = _splits(args, args.task, args.n_concept, args.n_operating, args.n_eval)
    enc = _encode_splits(model, splits)
    lw = list(_label_words(args, task)) if args.readout == "logits" else None
    with run.timed("directions"):
        dirs = ConceptDirections.fit(
            model,
            enc.concept.texts,
            list(enc.concept.labels),
            batch_size=args.batch_size,
            progress=args.progress,
        )
    sur: dict[tuple[str, int], Surrogate] = {}
    for basis in bases:
        for d in sorted(set(ds) | {args.d_ref}):
            print(f"fit: basis {basis}, d = {d}", flush=True)
            with run.timed(f"fit/{basis}"):
                sur[basis, d] = Surrogate.fit(
                    model,
                    enc.operating.texts,
                    dirs,
                    d=d,
                    basis=basis,
                    readout=args.readout,
                    label_words=lw,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    progress=args.progress,
                )
    measured = {}
    for eps in sorted(set(epss) | {args.eps_ref}):
        print(f"scan: ε = {eps:g}", flush=True)
        with run.timed("scan"):
            measured[eps] = scan_gains(
                model,
                enc.eval.texts,
                dirs,
                eps=eps,
                readout=args.readout,
                label_words=lw,
                batch_size=args.batch_size,
                progress=args.progress,
            )
    with run.timed("exact"):
        exact = exact_gains(
            model,
            enc.eval.texts,
            dirs,
            readout=args.readout,
            label_words=lw,
            batch_size=args.batch_size,
            progress=args.progress,
        )
    # how linear is the full model at each ε: the scan over the exact first-order gain, per layer
    lin_rows = []
    for layer in range(len(exact)):
        row: dict = {"layer": layer, "exact": float(exact[layer])}
        for eps in epss:
            row[f"r{eps:g}"] = float(measured[eps][layer] / exact[layer])
        lin_rows.append(row)
    fids = {eps: fidelity(exact, measured[eps]) for eps in epss}
    lin_rows.append({"layer": "Spearman", **{f"r{e:g}": f.spearman for e, f in fids.items()}})
    lin_rows.append({"layer": "Pearson", **{f"r{e:g}": f.pearson for e, f in fids.items()}})
    rows = []
    for basis in bases:
        for sweep, xs in (("d", ds), ("eps", epss)):
            for x in xs:
                d, eps = (x, args.eps_ref) if sweep == "d" else (args.d_ref, x)
                s = sur[basis, d]
                for variant, g in (("per-prompt", s.gains), ("paper", s.gains_paper)):
                    f = fidelity(g, measured[eps])
                    rows.append(
                        dict(
                            sweep=sweep,
                            basis=basis,
                            d=d,
                            eps=eps,
                            variant=variant,
                            spearman=f.spearman,
                            pearson=f.pearson,
                        )
                    )
    cols = [
        ("basis", "basis", ""),
        ("d", "d", ""),
        ("eps", "ε", "g"),
        ("variant", "gains", ""),
        ("spearman", "Spearman", ".3f"),
        ("pearson", "Pearson", ".3f"),
    ]
    run.table(f"Fidelity vs d (ε = {args.eps_ref:g})", [r for r in rows if r["sweep"] == "d"], cols)
    run.table(f"Fidelity vs ε (d = {args.d_ref})", [r for r in rows if r["sweep"] == "eps"], cols)
    run.table(
        "Linearity of the full model: scan(ε) / exact first-order gain, per layer "
        "(1 = linear; last rows: scan(ε) vs exact across layers)",
        lin_rows,
        [("layer", "layer", ""), ("exact", "exact gain", ".4g")]
        + [(f"r{eps:g}", f"ε = {eps:g}", ".3f") for eps in epss],
    )
    pp = [r for r in rows if r["variant"] == "per-prompt"]
    plots.plot_ablation(
        [r for r in pp if r["sweep"] == "d"],
        run.path("ablation_d.png"),
        x="d",
        hue="basis",
        title=f"Fidelity vs reduced order d ({task.name}, ε = {args.eps_ref:g})",
    )
    plots.plot_ablation(
        [r for r in pp if r["sweep"] == "eps"],
        run.path("ablation_eps.png"),
        x="eps",
        hue="basis",
        title=f"Fidelity vs scan step ε ({task.name}, d = {args.d_ref})",
    )
    run.results.update(
        rows=rows,
        measured={str(k): v for k, v in measured.items()},
        exact=exact,
        linearity=lin_rows,
        predicted={f"{b}/{d}": s.gains for (b, d), s in sur.items()},
    )
    run.finish()
    return 0


# =============================================================================================
# argument parsing
# =============================================================================================


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument(
        "--model",
        default=None,
        help=f"model name (default: {DEFAULT_MODEL}, offline; for scan/control/"
        "generate: the model recorded by the earlier step)",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default: 1; measured fastest on 2-core machines)",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="where converted models are cached (default: $STEERLIN_CACHE or ~/.cache/steerlin)",
    )
    g.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="model dtype (default: float32, or the one recorded by fit)",
    )
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--seed", type=int, default=0, help="seed for splits and bases (default: 0)")
    g.add_argument(
        "--batch-size", type=_positive_int, default=16, help="prompts per batch (default: 16)"
    )
    g.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default per command; an existing non-empty folder is "
        "never overwritten: DIR-1, DIR-2, ... are used instead)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="write into --out even if it is not empty"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _sizes(p, n_concept=400, n_operating=200, n_eval=200) -> None:
    p.add_argument(
        "--n-concept",
        type=_positive_int,
        default=n_concept,
        help=f"concept-split prompts per class (default: {n_concept})",
    )
    p.add_argument(
        "--n-operating",
        type=_positive_int,
        default=n_operating,
        help=f"operating-split prompts per class (default: {n_operating})",
    )
    p.add_argument(
        "--n-eval",
        type=_positive_int,
        default=n_eval,
        help=f"eval-split prompts per class (default: {n_eval})",
    )


def _data(p, template=True) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"local task data folder (default: ${DATA_ENV}, else Hugging Face online)",
    )
    if template:
        p.add_argument(
            "--template", default="{text}", help="prompt template with {text} (default: '{text}')"
        )


def _energy_opts(p) -> None:
    p.add_argument(
        "--baselines",
        default="uniform,last,random",
        help="heuristic schedules to compare: uniform, last, random, single:<l> "
        "(default: uniform,last,random; '' for none)",
    )
    p.add_argument(
        "--n-random", type=_positive_int, default=5, help="random single-layer draws (default: 5)"
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="steerlin",
        description="Predict per-layer steering gains with a low-order linear (LLV) surrogate "
        "of a transformer's depth dynamics and compute minimum-energy steering schedules "
        "(arXiv 2603.12541).",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_, description=None):
        p = sub.add_parser(name, parents=[common], help=help_, description=description or help_)
        p.set_defaults(func=func)
        return p

    p = add(
        "demo",
        cmd_demo,
        "offline tour: fit, gains, fidelity, energy, steered generation",
        "Offline end-to-end demo on Gemma-3-270m and the SST-2 sample shipped with steerlin: "
        "fit directions and the surrogate, scan full-model gains, compare schedule energies, "
        "and generate text with and without steering. Writes gains.png, energy.png, "
        "schedule.png, results.json and results.md to steerlin-demo/.",
    )
    _sizes(p, 100, 50, 50)
    p.add_argument("--d", type=_positive_int, default=32, help="surrogate order (default: 32)")
    p.add_argument("--eps", type=float, default=0.1, help="scan step ε (default: 0.1)")
    p.add_argument("--template", default="{text}", help=argparse.SUPPRESS)
    p.add_argument(
        "--target-frac",
        type=float,
        default=0.5,
        help="target = this × the class-mean separation of the concept readout on "
        "the eval split (default: 0.5)",
    )
    _energy_opts(p)
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="generation prompt (repeatable; default: 'The movie was', 'I think this film')",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=20,
        help="tokens to generate per prompt (default: 20)",
    )
    p.add_argument(
        "--steer-scale",
        type=float,
        default=15.0,
        help="generation uses the calibrated LLV schedule × -SCALE, toward the negative pole "
        "(default: 15; the calibrated target itself barely changes greedy text)",
    )
    p.add_argument(
        "--n-energy",
        type=_positive_int,
        default=16,
        help="eval prompts per class for the energy target and calibrations (default: 16)",
    )
    p.add_argument("--no-generate", action="store_true", help="skip the generation step")

    p = add("fit", cmd_fit, "fit concept directions and the LLV surrogate on a task")
    p.add_argument(
        "--task",
        required=True,
        help="task name (sst2, irony, hate, ..., or 'demo' for the shipped sample)",
    )
    _data(p)
    _sizes(p)
    p.add_argument("--d", type=_positive_int, default=32, help="surrogate order (default: 32)")
    p.add_argument(
        "--basis",
        choices=("krylov", "pod", "random"),
        default="krylov",
        help="reduction basis (default: krylov)",
    )
    p.add_argument(
        "--readout",
        choices=("concept", "logits"),
        default="concept",
        help="readout y (default: concept)",
    )
    p.add_argument(
        "--variant",
        choices=("per-prompt", "paper"),
        default="per-prompt",
        help="gain variant (default: per-prompt)",
    )
    p.add_argument(
        "--label-words",
        default=None,
        help="'POS,NEG' words for the logit readout (default: the task's)",
    )

    p = add("scan", cmd_scan, "measure full-model gains on a fit's eval split; fidelity")
    p.add_argument("--fit-dir", required=True, help="output folder of `steerlin fit`")
    p.add_argument("--eps", type=float, default=0.1, help="scan step ε (default: 0.1)")
    p.add_argument(
        "--method",
        choices=("cached", "hooks"),
        default="cached",
        help="cached single-token path or full forwards with hooks (default: cached)",
    )
    p.add_argument("--no-exact", action="store_true", help="skip the exact first-order gains")

    p = add("control", cmd_control, "minimum-energy steering schedule for a target shift")
    p.add_argument("--fit-dir", required=True, help="output folder of `steerlin fit`")
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="readout shift Δy to reach (default: half the class-mean separation recorded by fit)",
    )
    p.add_argument(
        "--layers", default=None, help="allowed layers, e.g. '2-17' or '3,5,7' (default: all)"
    )
    _energy_opts(p)
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="rescale every schedule on the full model (bisection) to really reach "
        "the target; writes energy.png",
    )
    p.add_argument(
        "--llama-cpp",
        default=None,
        metavar="FILE",
        help="also export a llama.cpp control-vector GGUF",
    )

    p = add("generate", cmd_generate, "greedy generation, steered vs unsteered")
    p.add_argument("--schedule", required=True, help="schedule.safetensors from control/demo")
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt (repeatable; default: two movie-review openings)",
    )
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=30, help="tokens to generate (default: 30)"
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the schedule (negative flips the direction; default: 1)",
    )

    p = add("reproduce", cmd_reproduce, "the paper's per-task fidelity and energy tables")
    p.add_argument(
        "--tasks",
        default="sst2,irony,hate",
        help="comma-separated tasks (default: sst2,irony,hate)",
    )
    _data(p)
    _sizes(p)
    p.add_argument("--d", type=_positive_int, default=32, help="surrogate order (default: 32)")
    p.add_argument("--eps", type=float, default=0.1, help="scan step ε (default: 0.1)")
    p.add_argument("--label-words", default=None, help="'POS,NEG' (default: each task's)")
    p.add_argument(
        "--target-frac",
        type=float,
        default=0.5,
        help="energy target = this × class-mean separation (default: 0.5)",
    )
    _energy_opts(p)
    p.add_argument(
        "--n-energy",
        type=_positive_int,
        default=None,
        help="eval prompts per class for the energy target and calibrations (default: all)",
    )
    p.add_argument("--no-energy", action="store_true", help="skip the energy comparison")

    p = add("scaling", cmd_scaling, "fidelity against model size")
    p.add_argument("--models", required=True, help="comma-separated model names")
    p.add_argument("--task", default="sst2", help="task (default: sst2)")
    _data(p)
    _sizes(p)
    p.add_argument("--d", type=_positive_int, default=32, help="surrogate order (default: 32)")
    p.add_argument("--eps", type=float, default=0.1, help="scan step ε (default: 0.1)")

    p = add("ablate", cmd_ablate, "fidelity against d, ε and the basis")
    p.add_argument("--d", default="4,8,16,32,64", help="orders to try (default: 4,8,16,32,64)")
    p.add_argument(
        "--eps",
        default="0.01,0.05,0.1,0.2,0.5",
        help="scan steps to try (default: 0.01,0.05,0.1,0.2,0.5)",
    )
    p.add_argument(
        "--basis", default="krylov,random", help="bases to compare (default: krylov,random)"
    )
    p.add_argument(
        "--d-ref", type=_positive_int, default=32, help="d used for the ε sweep (default: 32)"
    )
    p.add_argument(
        "--eps-ref", type=float, default=0.1, help="ε used for the d sweep (default: 0.1)"
    )
    p.add_argument("--task", default="sst2", help="task (default: sst2)")
    p.add_argument(
        "--readout",
        choices=("concept", "logits"),
        default="concept",
        help="readout (default: concept)",
    )
    p.add_argument("--label-words", default=None, help="'POS,NEG' (default: the task's)")
    _data(p)
    _sizes(p)
    return parser


def _version() -> str:
    try:
        from . import __version__

        return f"steerlin {__version__}"
    except ImportError:  # pragma: no cover
        return "steerlin"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `steerlin` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except SteerlinError as exc:
        print(f"steerlin {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
