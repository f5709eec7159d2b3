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
#: The data folder: $STEERLIN_DATA_DIR, else ../shared/data beside the repository.
DEFAULT_DATA = Path(os.environ.get("STEERLIN_DATA_DIR") or ROOT.parent / "shared" / "data")


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


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM; since the last `reset_peak_rss`). Not ru_maxrss:
    Linux carries the parent's peak across fork + exec into a child's ru_maxrss (a parent
    holding a loaded model would show in every child). ru_maxrss where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return max_rss_mib()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # pragma: no cover
        return False


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
    """The run's context: date, command, machine, load average, and `steerlin.report.versions`."""
    from steerlin.report import versions

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "quick": bool(getattr(args, "quick", False)),
        **versions(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_start": list(os.getloadavg()),
    }


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of dict rows (`steerlin.report.text_table`)."""
    from steerlin.report import text_table

    return text_table(rows, columns)


def write_results(name: str, args, env: dict[str, Any], payload: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json (<name>_quick.json with --quick; or --out): env +
    payload, and the load average at the end."""
    from steerlin.report import jsonable

    env = dict(env, loadavg_end=list(os.getloadavg()))
    suffix = "_quick" if getattr(args, "quick", False) else ""
    out = args.out or RESULTS / f"{name}{suffix}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = jsonable({"benchmark": name, **env, **payload})
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(
        f"\nwrote {out}  (load average start {env['loadavg_start'][0]:.2f}, "
        f"end {env['loadavg_end'][0]:.2f} on {env['cpu_count']} cores)"
    )
    return out


# ------------------------------------------------------------------------------------ children

#: help= of the internal flags (--child ...) the parent passes to a fresh interpreter
HIDDEN = argparse.SUPPRESS


def child_result(payload: dict[str, Any]) -> None:
    """In a child: print the one RESULT line the parent reads."""
    print("RESULT " + json.dumps(payload), flush=True)


def run_child(script: str, flags: Sequence[str], what: str) -> tuple[dict[str, Any], float]:
    """Run `python SCRIPT --child FLAGS` in a fresh interpreter (cold imports, its own RSS);
    return its RESULT payload and the process's wall seconds."""
    import subprocess

    cmd = [sys.executable, str(Path(script).resolve()), "--child", *map(str, flags)]
    say(f"fresh subprocess: {what}")
    proc, wall, _ = timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child ({what}) failed with exit code {proc.returncode}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :]), wall


def verdict(value: float, goal: float, *, at_least: bool) -> str:
    ok = value >= goal if at_least else value <= goal
    return "meets goal" if ok else "MISSES goal"


def sst2_setup(data_dir, sizes: str, d: int, model_name: str = "gemma-3-270m"):
    """The KL benchmarks' shared set-up: the model, SST-2 split (seed 0) into concept and
    operating prompts per class (`sizes` "nc,no"), class-mean directions on the concept split
    and a surrogate of order `d` on the operating split. Returns (model, splits, dirs, sur)."""
    import steerlin
    from steerlin.steer_eval import TASKS

    model = steerlin.load_model(model_name)
    tk = steerlin.load_task(TASKS["sst2"], data_dir=data_dir)
    nc, no = (int(x) for x in sizes.split(","))
    sp = tk.split(nc, no, 0, seed=0)
    dirs = steerlin.ConceptDirections.fit(
        model, sp.concept.texts, sp.concept.labels, label_names=tk.spec.class_names
    )
    sur = steerlin.Surrogate.fit(model, list(sp.operating.texts), dirs, d=d)
    return model, sp, dirs, sur
