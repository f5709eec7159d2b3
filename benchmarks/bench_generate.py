"""Generation speed under `with controller.schedule.apply(model):` vs unhooked, Gemma-3-270m.

The same SST-2 prompts, greedy (do_sample=False), KV cache on, a fixed number of new tokens
(stop_at_eos=False), one prompt at a time. The schedule is the minimum-energy one of a
surrogate fitted on a few operating prompts, for a target of one class-mean gap along the
readout; it injects at every layer with a non-zero amplitude (the worst case for hooks).
Plain and steered runs are interleaved (ABBA) over --rounds to spread drifting machine load
evenly; overhead = steered / plain - 1 on the median run, also on process CPU time.

Unembedding: TransformerLens 3's `Unembed.forward` computes `F.linear(x, W_U.T.contiguous())`,
which copies W_U (d_model x 262,144 for Gemma, 670 MB) on EVERY forward when W_U is stored
row-major, as TransformerLens loads it: ~70% of a generation step here. `steerlin.load_model`
stores W_U transposed in memory (same values and shape), so the copy disappears. The
benchmark measures both layouts: "fast" (steerlin's, the default of load_model) and "stock"
(a row-major W_U, what a model loaded by TransformerLens itself has), so both the strict hook
overhead and the speed-up of the layout are on record.

Goal: overhead <= 5%.

    python benchmarks/bench_generate.py                 # 4 prompts x 16 tokens, 2 ABBA rounds
    python benchmarks/bench_generate.py --quick         # 2 prompts x 8 tokens x 1 round
    python benchmarks/bench_generate.py --unembed fast --n 8 --new-tokens 32 --rounds 3
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager

import _common as C
import torch

GOAL = 0.05


def generate_all(model, prompts, new_tokens: int) -> list[torch.Tensor]:
    return [
        model.generate(
            model.to_tokens(p),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_past_kv_cache=True,
            stop_at_eos=False,
            verbose=False,
        )
        for p in prompts
    ]


@contextmanager
def unembed_mode(model, mode: str):
    """'fast': W_U as steerlin stores it (W_U.T contiguous: no per-forward copy); 'stock': a
    row-major W_U as TransformerLens loads it (TransformerLens copies it on every forward)."""
    ue = model.unembed
    saved = ue.W_U
    if mode == "stock":
        ue.W_U = torch.nn.Parameter(saved.detach().contiguous(), requires_grad=False)
    elif not saved.T.is_contiguous():
        ue.W_U = torch.nn.Parameter(saved.detach().T.contiguous().T, requires_grad=False)
    try:
        yield
    finally:
        ue.W_U = saved


def measure(model, sched, prompts, new_tokens, rounds, threads, unembed) -> dict:
    generate_all(model, prompts[:1], 2)  # warm-up
    with sched.apply(model):
        generate_all(model, prompts[:1], 2)
    times = {"plain": [], "steered": []}
    cpus = {"plain": [], "steered": []}
    outs = {}
    for r in range(rounds):
        order = ("plain", "steered", "steered", "plain")
        if r % 2:
            order = order[::-1]
        for mode in order:
            if mode == "plain":
                out, wall, cpu = C.timed(lambda: generate_all(model, prompts, new_tokens))
            else:
                with sched.apply(model):
                    out, wall, cpu = C.timed(lambda: generate_all(model, prompts, new_tokens))
            times[mode].append(wall)
            cpus[mode].append(cpu)
            outs[mode] = out
        C.say(
            f"threads={threads} unembed={unembed} round {r + 1}/{rounds}: plain "
            f"{statistics.median(times['plain']):.2f} s, steered "
            f"{statistics.median(times['steered']):.2f} s"
        )
    n = len(prompts)
    total = n * new_tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpus.items()}
    pairs = zip(outs["plain"], outs["steered"], strict=True)
    changed = sum(not torch.equal(a, b) for a, b in pairs)
    return {
        "threads": threads,
        "unembed": unembed,
        "prompts": n,
        "new_tokens": new_tokens,
        "runs_per_mode": len(times["plain"]),
        "plain_tok_s": total / med["plain"],
        "steered_tok_s": total / med["steered"],
        "overhead": med["steered"] / med["plain"] - 1,
        "overhead_min": min(times["steered"]) / min(times["plain"]) - 1,
        "overhead_cpu": med_cpu["steered"] / med_cpu["plain"] - 1,
        "hooked_layers": len(sched.layers),
        "outputs_changed": f"{changed}/{n}",
        "plain_s": times["plain"],
        "steered_s": times["steered"],
    }


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0], n=4)
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per prompt (16; quick 8)")
    p.add_argument("--rounds", type=int, default=None, help="ABBA rounds (2; quick 1)")
    p.add_argument("--unembed", default="fast,stock", help="fast, stock or both (default both)")
    p.add_argument("--fit-n", type=int, default=16, help="operating prompts for the surrogate")
    p.add_argument("--d", type=int, default=8, help="surrogate order (only shapes the schedule)")
    args = p.parse_args()
    counts = C.thread_counts(args.threads)
    C.set_threads(counts[0])
    n = C.pick(args, 4, 2)
    new_tokens = args.new_tokens or (8 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 2)
    modes = [m.strip() for m in args.unembed.split(",") if m.strip()]
    if not modes or set(modes) - {"fast", "stock"}:
        raise SystemExit(f"--unembed: expected fast, stock or fast,stock; got {args.unembed!r}")
    env = C.environment(args)

    from steerlin import ConceptDirections, Controller, Surrogate

    model = C.load_gemma()
    splits = C.sst2_splits(args.data_dir, 16, math.ceil(args.fit_n / 2), math.ceil(n / 2))
    prompts = C.texts(splits.eval)[:n]
    dirs = ConceptDirections.fit(model, C.texts(splits.concept), list(splits.concept.labels))
    sur = Surrogate.fit(model, C.texts(splits.operating)[: args.fit_n], dirs, d=args.d)
    target = float(dirs.vectors[-1].norm())  # one class-mean gap along unit_L
    sched = Controller(sur, target, units="raw").schedule
    C.say(f"schedule: {len(sched.layers)} hooked layers, target {target:.4g}")

    rows = []
    for threads in counts:
        C.set_threads(threads)
        for mode_u in modes:
            with unembed_mode(model, mode_u):
                rows.append(measure(model, sched, prompts, new_tokens, rounds, threads, mode_u))
    cols = [
        "threads",
        "unembed",
        "prompts",
        "new_tokens",
        "runs_per_mode",
        "plain_tok_s",
        "steered_tok_s",
        "overhead",
        "overhead_min",
        "overhead_cpu",
        "hooked_layers",
        "outputs_changed",
    ]
    print(C.table(rows, cols))
    for r in rows:
        print(
            f"threads={r['threads']} unembed={r['unembed']}: overhead "
            f"{100 * r['overhead']:+.1f}% (median), "
            f"{100 * r['overhead_cpu']:+.1f}% (CPU time): "
            f"{C.verdict(r['overhead'], GOAL, at_least=False)} <= 5%"
        )
    C.write_results(
        "bench_generate",
        args,
        env,
        {
            "config": {
                "prompts": n,
                "new_tokens": new_tokens,
                "rounds": rounds,
                "unembed": modes,
                "fit_n": args.fit_n,
                "d": args.d,
                "target": target,
                "hooked_layers": sched.layers,
                "energy": sched.energy,
            },
            "goals": {"overhead_at_most": GOAL},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
