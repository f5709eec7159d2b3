"""Gemma-3-270m load times: the one-time GGUF -> fp32 HookedTransformer conversion, and the
cached reload, each in a fresh subprocess with a fresh temporary cache folder.

The user's own cache (~/.cache/steerlin or $STEERLIN_CACHE) is never touched: the conversion
writes into a temporary folder, which the reloads then read, and which is deleted at the end.
Each child reports `import steerlin` and `load_model()` times separately, and its peak RSS.

    python benchmarks/bench_load.py                 # 1 conversion + 3 cached reloads
    python benchmarks/bench_load.py --quick         # 1 conversion + 1 cached reload
    python benchmarks/bench_load.py --reloads 5
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

import _common as C


def child(args) -> None:
    import time

    C.set_threads(C.thread_counts(args.threads)[0])
    t0 = time.perf_counter()
    import steerlin

    t1 = time.perf_counter()
    model = steerlin.load_model(cache_dir=args.cache_dir)
    t2 = time.perf_counter()
    ok = model.cfg.n_layers
    out = {"import_s": t1 - t0, "load_s": t2 - t1, "n_layers": ok, "ru_maxrss_mib": C.max_rss_mib()}
    C.child_result(out)


def run_child(args, cache: Path, what: str) -> dict:
    flags = ["--cache-dir", cache, "--threads", args.threads]
    out, wall = C.run_child(__file__, flags, what)
    out["process_s"] = wall
    out["what"] = what
    C.say(f"{what}: load_model {out['load_s']:.1f} s (process {wall:.1f} s)")
    return out


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reloads", type=int, default=None, help="cached reloads (3; quick 1)")
    p.add_argument("--child", action="store_true", help=C.HIDDEN)
    p.add_argument("--cache-dir", default=None, help=C.HIDDEN)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    reloads = args.reloads or (1 if args.quick else 3)
    env = C.environment(args)
    tmp = Path(tempfile.mkdtemp(prefix="steerlin-bench-cache-"))
    try:
        rows = [run_child(args, tmp, "first load (conversion)")]
        for i in range(reloads):
            rows.append(run_child(args, tmp, f"cached reload {i + 1}"))
        cache_mib = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(C.table(rows, ["what", "import_s", "load_s", "process_s", "ru_maxrss_mib"]))
    reload_s = statistics.median(r["load_s"] for r in rows[1:])
    print(
        f"\nconversion {rows[0]['load_s']:.1f} s; cached reload {reload_s:.1f} s (median of "
        f"{reloads}), {rows[0]['load_s'] / reload_s:.1f}x faster; cache {cache_mib:.0f} MiB"
    )
    C.write_results(
        "bench_load",
        args,
        env,
        {
            "config": {"reloads": reloads},
            "rows": rows,
            "conversion_s": rows[0]["load_s"],
            "cached_reload_s_median": reload_s,
            "cache_mib": cache_mib,
        },
    )


if __name__ == "__main__":
    main()
