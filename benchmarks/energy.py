"""Energy table (issue 5): calibrated energy of the LLV schedule vs heuristics on Gemma-3-270m.

    python benchmarks/energy.py --tasks sst2,irony,hate --sizes 100,50,25

Target: half the class-mean separation of the concept readout <unit_L, x_L> on the eval split.
Prints one markdown table per task and writes benchmarks/results/energy.json.
"""

import argparse
import json
from pathlib import Path

import _common as C
import torch

import steerlin
from steerlin.experiments import separation
from steerlin.report import columns, jsonable, md_table

COLUMNS = columns(
    "strategy energy ratio_to_llv raw_energy raw_ratio_to_llv",
    ("measured_shift", "shift", ".4g"),
    "evaluations",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="sst2,irony,hate")
    ap.add_argument("--sizes", default="100,50,25", help="concept,operating,eval per class")
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--n-random", type=int, default=5)
    ap.add_argument("--data-dir", default=str(C.DEFAULT_DATA), help="task data folder")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nc, no, ne = (int(x) for x in args.sizes.split(","))
    model = steerlin.load_model()
    out = {}
    for name in args.tasks.split(","):
        sp = steerlin.load_task(name, data_dir=args.data_dir).split(nc, no, ne, seed=0)
        dirs = steerlin.ConceptDirections.fit(model, sp.concept.texts, sp.concept.labels)
        sur = steerlin.Surrogate.fit(model, sp.operating.texts, dirs, d=args.d)
        target = separation(model, sp.eval.texts, sp.eval.labels, dirs)["half_separation"]
        rows = steerlin.compare_energy(
            model, sp.eval.texts, sur, target, units="raw", n_random=args.n_random
        )
        out[name] = {"target": target, "rows": rows}
        print(f"\n{name}: target {target:+.1f} (0.5 x class-mean separation)")
        print(md_table(rows, COLUMNS))
    path = Path(__file__).parent / "results" / "energy.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(jsonable(out), indent=1))


if __name__ == "__main__":
    main()
