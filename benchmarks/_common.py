"""Shared plumbing for the benchmark scripts: flags, threads, model and SST-2 loading, timing,
tables and JSON results.

Each script is one command, `python benchmarks/<name>.py [--threads 1] [--n N] [--quick]`,
prints a table and writes `benchmarks/results/<name>.json` (`<name>_quick.json` with --quick,
so a smoke run never overwrites real figures): every number, the command, the
date, versions, thread count and the machine's load average before and after, since timings
on a shared machine are only as good as the load they ran under).

Threads are set here, from the flag, never in the library. Wall-clock AND process CPU seconds
are recorded for every timed step: on a loaded machine the CPU time is the steadier number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = Path("/work/shared/data")


# ------------------------------------------------------------------------------------ flags


def parser(
    description: str, *, n: int | None = None, threads: str = "1"
) -> argparse.ArgumentParser:
    """The common flags: --threads (one count or a comma list), --n, --quick, --data-dir, --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--threads",
        default=threads,
        help=f"torch intra-op threads; a comma list (e.g. 1,2) measures each (default {threads})",
    )
    if n is not None:
        p.add_argument("--n", type=int, default=None, help=f"number of prompts (default {n})")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script runs")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help=f"folder holding sst2/train.tsv (default {DEFAULT_DATA})",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/<name>.json)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    return p


def thread_counts(spec: str) -> list[int]:
    try:
        counts = [int(t) for t in str(spec).split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--threads: expected integers like 1 or 1,2, got {spec!r}") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"--threads: expected positive integers, got {spec!r}")
    return counts


def set_threads(n: int) -> None:
    """torch intra-op threads for what follows (the library never sets them)."""
    import torch

    torch.set_num_threads(int(n))


def pick(args, full: int, quick: int, attr: str = "n") -> int:
    """--n if given, else the quick or the full default."""
    value = getattr(args, attr, None)
    if value is not None:
        return int(value)
    return quick if args.quick else full


# ------------------------------------------------------------------------------------ model, data


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_gemma():
    """The offline Gemma-3-270m from steerlin's cache (converted once if absent)."""
    import steerlin

    t0 = time.perf_counter()
    model = steerlin.load_model()
    say(f"model loaded in {time.perf_counter() - t0:.1f} s")
    return model


def sst2_splits(data_dir: Path, n_concept: int, n_operating: int, n_eval: int, *, seed: int = 0):
    """Balanced disjoint SST-2 splits (counts PER CLASS) from data_dir (sst2/train.tsv)."""
    import warnings

    from steerlin import load_task

    if (
        not (Path(data_dir) / "sst2" / "train.tsv").is_file()
        and not (Path(data_dir) / "train.tsv").is_file()
    ):
        raise SystemExit(f"--data-dir {data_dir}: no sst2/train.tsv there")
    task = load_task("sst2", data_dir=data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return task.split(n_concept, n_operating, n_eval, seed=seed)


def texts(split) -> list[str]:
    return list(split.texts)


# ------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, process CPU seconds) of fn()."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def repeat(fn: Callable[[], Any], n: int) -> dict[str, Any]:
    """Run fn n times; min / median wall and CPU seconds and the last result."""
    walls, cpus, out = [], [], None
    for _ in range(max(1, n)):
        out, wall, cpu = timed(fn)
        walls.append(wall)
        cpus.append(cpu)
    return {
        "result": out,
        "wall_min": min(walls),
        "wall_median": statistics.median(walls),
        "cpu_min": min(cpus),
        "cpu_median": statistics.median(cpus),
        "walls": walls,
        "cpus": cpus,
    }


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_status_mib() -> dict[str, float]:
    """Current VmRSS and its split into anonymous and file-backed pages (Linux), MiB."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return out


class RssSampler:
    """Background thread sampling /proc/self/status every `interval` s: the peak VmRSS with its
    anon/file split at that moment, and the peak RssAnon (file-backed pages, e.g. an mmapped
    safetensors file, count in RSS and ru_maxrss but are reclaimable)."""

    def __init__(self, interval: float = 0.01) -> None:
        import threading

        self.interval = interval
        self.peak: dict[str, float] = {"VmRSS": 0.0}
        self.peak_anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        s = proc_status_mib()
        if s.get("VmRSS", 0.0) > self.peak["VmRSS"]:
            self.peak = s
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0.0))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def reading(self) -> dict[str, float]:
        self.sample()
        return {
            "peak_vmrss_mib": self.peak.get("VmRSS"),
            "anon_at_peak_mib": self.peak.get("RssAnon"),
            "file_at_peak_mib": self.peak.get("RssFile"),
            "peak_anon_mib": self.peak_anon,
        }


# ------------------------------------------------------------------------------------ output


def environment(args) -> dict[str, Any]:
    import torch

    try:
        from importlib.metadata import version

        tl = version("transformer-lens")
    except Exception:  # pragma: no cover
        tl = "?"
    import steerlin

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "quick": bool(getattr(args, "quick", False)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformer_lens": tl,
        "steerlin": steerlin.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_start": list(os.getloadavg()),
    }


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of dict rows (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    columns = list(columns)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                return str(v)
            if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
                return f"{v:.3e}"
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, sep, *body])


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    return v


def write_results(name: str, args, env: dict[str, Any], payload: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json (<name>_quick.json with --quick; or --out): env +
    payload, and the load average at the end."""
    env = dict(env, loadavg_end=list(os.getloadavg()))
    suffix = "_quick" if getattr(args, "quick", False) else ""
    out = args.out or RESULTS / f"{name}{suffix}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable({"benchmark": name, **env, **payload}), indent=1) + "\n")
    print(
        f"\nwrote {out}  (load average start {env['loadavg_start'][0]:.2f}, "
        f"end {env['loadavg_end'][0]:.2f} on {env['cpu_count']} cores)"
    )
    return out


def verdict(value: float, goal: float, *, at_least: bool) -> str:
    ok = value >= goal if at_least else value <= goal
    return "meets goal" if ok else "MISSES goal"
