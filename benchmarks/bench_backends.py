"""The public entry points on Gemma-3-270m under the installed TransformerLens line: the
HookedTransformer backend (3.x) or the TransformerBridge backend (4.x, frozen block maps by the
full-sequence route). Run it once per venv, then compare:

    .venv/bin/python benchmarks/bench_backends.py             # -> results/bench_backends_tl3.json
    .venv-tl4/bin/python benchmarks/bench_backends.py         # -> results/bench_backends_tl4.json
    python benchmarks/bench_backends.py --compare             # the TL4 / TL3 ratio table

Same prompts (the shipped SST-2 demo sample), same sizes, one thread. The two legs run in
different processes, so each ratio divides figures from two runs: compare them under the same
machine load (both files record the load average).
"""

from __future__ import annotations

import json

import _common as C
import torch


def run(args) -> dict:
    from steerlin import (
        ConceptDirections,
        Controller,
        Surrogate,
        calibrate,
        capture,
        exact_gains,
        load_demo_task,
        scan_gains,
    )
    from steerlin.backend import get
    from steerlin.regime import generate

    model = C.load_gemma()
    task = load_demo_task()
    n = C.pick(args, 8, 4)
    texts = list(task.prompts.texts)
    labels = list(task.prompts.labels)
    pos = [t for t, y in zip(texts, labels, strict=True) if y == 1][:n]
    neg = [t for t, y in zip(texts, labels, strict=True) if y == 0][:n]
    ops = texts[-n:]
    rows, out = [], {}

    def step(name, fn):
        res, wall, cpu = C.timed(fn)
        rows.append({"step": name, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})
        C.say(f"{name}: {wall:.1f} s")
        return res

    f64 = lambda t: torch.as_tensor(t).detach().to(torch.float64).cpu().tolist()  # noqa: E731
    states = step("capture", lambda: capture(model, pos + neg))
    dirs = step("directions", lambda: ConceptDirections.fit(model, pos + neg, [1] * n + [0] * n))
    sur = step("Surrogate.fit d=8", lambda: Surrogate.fit(model, ops, dirs, d=8))
    exact = step("exact_gains", lambda: exact_gains(model, ops, dirs))
    scan = step("scan_gains", lambda: scan_gains(model, ops[: max(2, n // 2)], dirs))
    ctrl = Controller(sur, 1.0)
    cal = step(
        "calibrate",
        lambda: calibrate(model, ops[:2], ctrl.schedule, float(ctrl.target[0]), units="raw"),
    )
    gen = step("generate steered 4x10", lambda: generate(model, ops[:4], 10, ctrl))
    out["rows"] = rows
    # the numbers, for the cross-backend agreement (--compare)
    out["values"] = {
        "capture": f64(states.states),
        "directions": f64(dirs.unit),
        "surrogate_gains": f64(sur.gains),
        "exact_gains": f64(exact),
        "scan_gains": f64(scan),
        "calibrate_multiplier": float(cal.multiplier),
        "generate_steered": gen.new_ids.tolist(),
    }
    out["backend"] = get(model).name
    out["n"] = n
    return out


def compare() -> None:
    docs = {}
    for leg in ("tl3", "tl4"):
        path = C.RESULTS / f"bench_backends_{leg}.json"
        if not path.is_file():
            raise SystemExit(f"{path} missing: run this script in the {leg} venv first")
        docs[leg] = json.loads(path.read_text())
    three = {r["step"]: r for r in docs["tl3"]["rows"]}
    rows = []
    for r in docs["tl4"]["rows"]:
        ref = three.get(r["step"])
        if ref is None:
            continue
        rows.append(
            {
                "step": r["step"],
                "tl3_cpu_s": ref["cpu_s"],
                "tl4_cpu_s": r["cpu_s"],
                "tl4/tl3": round(r["cpu_s"] / max(ref["cpu_s"], 1e-9), 1),
            }
        )
    print(C.table(rows))
    vals = [docs[leg].get("values") for leg in ("tl3", "tl4")]
    if all(vals):
        agree = []
        for key, ref in vals[0].items():
            got = vals[1].get(key)
            if key == "generate_steered":
                same = sum(
                    a == b
                    for ra, rb in zip(ref, got, strict=True)
                    for a, b in zip(ra, rb, strict=True)
                )
                total = sum(len(r) for r in ref)
                agree.append({"quantity": key, "agreement": f"{same}/{total} tokens identical"})
                continue
            a = torch.tensor(got, dtype=torch.float64)
            b = torch.tensor(ref, dtype=torch.float64)
            err = float((a - b).abs().max() / b.abs().max())
            agree.append({"quantity": key, "agreement": f"{err:.1e} of the largest |value|"})
        print("\nTL4 vs TL3 on the same Gemma-3-270m weights:")
        print(C.table(agree))


def main() -> None:
    p = C.parser(__doc__.splitlines()[0], n=8)
    p.add_argument("--compare", action="store_true", help="print the TL4/TL3 table and exit")
    args = p.parse_args()
    if args.compare:
        compare()
        return
    C.set_threads(C.thread_counts(args.threads)[0])
    env = C.environment(args)
    torch.manual_seed(0)
    payload = run(args)
    print(C.table(payload["rows"]))
    leg = "tl4" if payload["backend"] == "bridge" else "tl3"
    C.write_results(f"bench_backends_{leg}", args, env, payload)


if __name__ == "__main__":
    main()
