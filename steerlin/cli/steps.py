"""Steps several subcommands share: model and task loading, prompt encoding, the fidelity run,
energy calibration, generation, and reading an earlier `steerlin fit` folder."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SteerlinError
from ..loading import DEFAULT_MODEL
from ..regime import generate
from ..report import md_table, read_json
from ..surrogate import DEFAULT_BASIS
from .common import DATA_ENV, DTYPES, CliError, Run, _csv, parse_layers, seam


def _fidelity(
    args, model, enc, task: str, *, readouts=("concept",), label_words=None, label_names=None
):
    """run_fidelity with the CLI's shared settings (--basis, --d, --eps, --batch-size...)."""
    from ..experiments import run_fidelity

    return run_fidelity(
        model,
        enc,
        task=task,
        d=args.d,
        bases=(getattr(args, "basis", DEFAULT_BASIS),),
        readouts=readouts,
        eps=args.eps,
        label_words=label_words,
        batch_size=args.batch_size,
        seed=args.seed,
        exact_eval=True,
        progress=args.progress,
        label_names=label_names,
    )


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
    model = seam("resolve_model")(name, device=args.device, dtype=dtype, cache_dir=cache)
    if run is not None:
        run.timings["load_model"] = time.perf_counter() - t
        run.config.update(model=name, dtype=str(dtype).removeprefix("torch."))
    return model


def _data_dir(args) -> str | None:
    return getattr(args, "data_dir", None) or os.environ.get(DATA_ENV) or None


def _precheck(args, tasks=()) -> None:
    """The cheap arguments, checked before the model loads (10-60 s): task names, the data
    folder and the prompt template. CliError (exit 2) names the option."""
    from ..data.registry import get_task_spec
    from .common import DEMO_TASKS, resolve_task

    data_dir = _data_dir(args)
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        where = "--data-dir" if getattr(args, "data_dir", None) else DATA_ENV
        raise CliError(f"{where}: {data_dir!r} is not a folder")
    template = getattr(args, "template", None)
    if template is not None and "{text}" not in template:
        raise CliError(f"--template: expected a template containing '{{text}}', got {template!r}")
    if seam("resolve_task") is not resolve_task:  # a replaced seam knows its own task names
        return
    for name in tasks:
        if name.strip().lower() in DEMO_TASKS:
            continue
        try:
            get_task_spec(name)
        except SteerlinError as exc:
            raise CliError(f"--task: {exc}") from None


def _start(args, command: str, out: str, tasks=()) -> tuple[Run, object]:
    """A subcommand's start, in this order: the cheap checks (`_precheck`), its run folder
    (`Run`), the model."""
    _precheck(args, tasks)
    run = Run(args, command, out)
    return run, _load_model(args, run)


def _task_data(args, run: Run, model, name: str, step: str = "data") -> tuple:
    """One task's splits (--n-concept/--n-operating/--n-eval, timed as `step`), encoded, and
    the logit readout's label words (None for the concept readout): (task, splits, enc,
    words)."""
    with run.timed(step):
        task, splits = _splits(args, name, args.n_concept, args.n_operating, args.n_eval)
    enc = _encode_splits(model, splits)
    lw = list(_label_words(args, task)) if args.readout == "logits" else None
    return task, splits, enc, lw


def _splits(args, task_name: str, n_concept: int, n_operating: int, n_eval: int):
    task = seam("resolve_task")(task_name, data_dir=_data_dir(args), template=args.template)
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
    from ..readouts import make_readout

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
        name: _Prompts(seam("encode_prompts")(model, list(p.texts)), tuple(p.labels))
        for name, p in (
            ("concept", splits.concept),
            ("operating", splits.operating),
            ("eval", splits.eval),
        )
    }
    return _EncodedSplits(**enc)


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
    from ..verify import compare_energy

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
            units="raw",
            baselines=baselines,
            n_random=args.n_random,
            layers=parse_layers(getattr(args, "layers", None), surrogate.n_layers),
            batch_size=args.batch_size,
            seed=args.seed,
        )
    return rows


def _generate(model, prompts: Sequence[str], max_new_tokens: int, schedule=None) -> list[str]:
    """Greedy continuations (prompt removed), steered by `schedule` if given: `regime.generate`
    (one left-padded batch; the schedule on the last prompt token and every generated one)."""
    return generate(model, list(prompts), max_new_tokens, schedule).texts


def _gains_table(run: Run, title: str, surrogate, measured, exact=None) -> None:
    """One table of the per-layer gains: predicted (the surrogate's variant and the paper's),
    measured by the ±ε scan, and the exact first-order gains (if computed)."""
    rows = [
        {
            "layer": l,
            "predicted": float(surrogate.gains[l]),
            "paper": float(surrogate.gains_paper[l]),
            "measured": float(measured[l]),
            "exact": None if exact is None else float(exact[l]),
        }
        for l in range(surrogate.n_layers)
    ]
    columns = [
        ("layer", "layer", ""),
        ("predicted", f"LLV ({surrogate.variant})", ".4g"),
        ("paper", "LLV (paper)", ".4g"),
        ("measured", "measured ±ε", ".4g"),
        ("exact", "exact", ".4g"),
    ]
    run.table(title, rows, columns)


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


def _fit_record(fit_dir: str | Path) -> tuple[Path, dict, dict]:
    """(folder, results.json config, splits.json) of a `steerlin fit` output folder."""
    d = Path(fit_dir).expanduser()
    if not d.is_dir():
        raise CliError(f"--fit-dir: {str(d)!r} is not a folder (run `steerlin fit` first)")
    for f in ("directions.safetensors", "surrogate.safetensors", "splits.json"):
        if not (d / f).is_file():
            raise CliError(f"--fit-dir: {str(d)!r} lacks {f}; is it a `steerlin fit` output?")
    res = (
        read_json(d / "results.json", "--fit-dir", error=CliError)
        if (d / "results.json").is_file()
        else {}
    )
    return d, res.get("config", {}), read_json(d / "splits.json", "--fit-dir", error=CliError)


def _readout_args(surrogate) -> tuple[str, list[int] | None]:
    rd = surrogate.meta.get("readout", {"kind": "concept"})
    if rd.get("kind") == "logits":
        return "logits", [int(rd["pos_token"]), int(rd["neg_token"])]
    return "concept", None
