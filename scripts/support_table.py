"""The support table (family x TransformerLens line), written from the architecture matrix's
results, never by hand.

tests/test_arch_matrix.py records every check that passed for each family and writes
arch_matrix_tl3.json / arch_matrix_tl4.json to $STEERLIN_MATRIX_DIR (or $STEERLIN_REF_DIR, so
`make test` leaves them in .ci-ref/). This script reads them and writes docs/support.md and
the README section between the `<!-- support-table:start -->` / `<!-- support-table:end -->`
markers. A family is ✓ on a line only when every check passed there; a refused family shows
the error steerlin raises; a family with a missing check shows which (a failed test).

    python scripts/support_table.py               # run the matrix in .venv and .venv-tl4 first
    python scripts/support_table.py --from DIR    # read DIR/arch_matrix_tl{3,4}.json
    python scripts/support_table.py --from DIR --check   # CI: exit 1 with a diff if the
                                                         # committed files differ

--check compares what would be written with docs/support.md and the README section and writes
nothing. The installed versions named in docs/support.md are left out of the comparison (a
new transformers release is not a change of support; a note says when they differ).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = {"tl3": ROOT / ".venv", "tl4": ROOT / ".venv-tl4"}
LINES = {"tl3": "TransformerLens 3", "tl4": "TransformerLens 4"}
#: the checks of tests/test_arch_matrix.py, in the order the docs explain them
CHECKS = {
    "support": "logits equal the Hugging Face model's; the backend's readout equals the forward",
    "capture": "`capture` equals an unpadded forward",
    "exact_gains": "`exact_gains` equals the hook scan at small eps (raw units)",
    "fit": "full-order `Surrogate.fit` equals the exact gains; `reduction_error()` at d = 4",
    "fast": "fast engine equals TransformerLens's block, or the fallback is named",
    "generate": "a schedule under `generate`: same tokens with the K/V cache as without",
    "save_load": "Surrogate and Schedule save / load round trip",
    "half": "bfloat16: exact gains equal a float32 model's on the same rounded weights, or the "
    "error names what fails",
}
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"


def run_matrix(folder: Path) -> None:
    """tests/test_arch_matrix.py in each venv that exists, results into `folder`."""
    env = dict(os.environ, STEERLIN_MATRIX_DIR=str(folder), OMP_NUM_THREADS="1")
    for line, venv in VENVS.items():
        python = venv / "bin" / "python"
        if not python.exists():
            print(f"{line}: {venv} missing, skipped (make setup / make setup-tl4)")
            continue
        cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        subprocess.run([*cmd, "tests/test_arch_matrix.py"], cwd=ROOT, env=env, check=False)


def load(folder: Path) -> dict[str, dict]:
    out = {}
    for line in VENVS:
        path = folder / f"arch_matrix_{line}.json"
        if path.exists():
            out[line] = json.loads(path.read_text())
    if not out:
        sys.exit(f"no arch_matrix_tl3.json / arch_matrix_tl4.json in {folder}")
    return out


def cell(results: dict) -> tuple[str, str]:
    """(short cell, detail) for one family on one line."""
    support = results.get("support")
    if support is None:
        return "✗ not verified", "no result (the family's tests did not pass)"
    if support != "ok":
        return "✗ refused", support
    missing = [c for c in CHECKS if c not in results]
    if missing:
        return "✗ failed: " + ", ".join(missing), "checks that did not pass: " + ", ".join(missing)
    fast, half = results["fast"], results["half"]
    detail = "all checks passed" + ("" if fast == "ok" else f"; fast engine: {fast}")
    if half != "ok":
        return "✓ (float32/64 only)", f"{detail}; bfloat16/float16 refused: {half}"
    return "✓", detail


def fast_cell(results: dict) -> str:
    fast = results.get("fast")
    if fast is None:
        return "–"
    if fast == "ok":
        return "✓"
    what = fast.replace("falls back to TransformerLens's block: ", "")
    return f"TL's block ({what.split(' (')[0]})"


def tables(data: dict[str, dict]) -> tuple[str, str, dict[str, int]]:
    """(README table, docs table, ✓ count per line)."""
    first = next(iter(data.values()))
    families = list(first["families"])
    features = first["features"]
    lines = [l for l in VENVS if l in data]
    counts = {l: 0 for l in lines}
    head = ["Family (Hugging Face class)", "Features exercised"] + [LINES[l] for l in lines]
    if "tl3" in data:
        head.append("Fast engine (3.x)")
    readme = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    details = []
    for fam in families:
        arch, feat = features[fam]
        row = [f"{fam} (`{arch}`)", feat]
        for l in lines:
            short, detail = cell(data[l]["families"].get(fam, {}))
            counts[l] += short.startswith("✓")
            row.append(short)
            details.append(f"- **{fam}, {LINES[l]}**: {detail}")
        if "tl3" in data:
            row.append(fast_cell(data["tl3"]["families"].get(fam, {})))
        readme.append("| " + " | ".join(row) + " |")
    return "\n".join(readme), "\n".join(details), counts


def versions(data: dict[str, dict]) -> str:
    return "; ".join(
        f"{LINES[l]}: transformer-lens {d['transformer_lens']}, transformers {d['transformers']}"
        for l, d in data.items()
    )


def _summary(data: dict[str, dict], counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[l]} of {len(data[l]['families'])} ✓ on {LINES[l]}" for l in data)


def render(data: dict[str, dict]) -> dict[Path, str]:
    """What the script writes: path -> full text (docs/support.md, and README.md when it has
    the markers)."""
    table, details, counts = tables(data)
    summary = _summary(data, counts)
    checks = "\n".join(f"{i}. {text}" for i, text in enumerate(CHECKS.values(), 1))
    doc = f"""# Supported model families

Written by `python scripts/support_table.py` from the results of tests/test_arch_matrix.py
(do not edit by hand). Each family is a tiny random-weight model built offline from its
`transformers` configuration class (tests/_hf_tiny.py): on TransformerLens 4 wrapped in a
`TransformerBridge`, on TransformerLens 3 converted to a `HookedTransformer` by TransformerLens's
own weight conversion. ✓ means every check below passed on that line:

{checks}

Summary: {summary}. Versions: {versions(data)}.

{table}

A family the bridge backend does not drive is refused before any model run by an
`UnsupportedArchitectureError` naming the architecture and TransformerLens 3; "TL's block
(...)" in the last column names the feature for which the fast single-query engine hands over to
TransformerLens's own block (the same numbers, slower).

## Per family and line

{details}
"""
    out = {ROOT / "docs" / "support.md": doc}
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START in text and END in text:
        pre, rest = text.split(START, 1)
        _, post = rest.split(END, 1)
        section = (
            f"{START}\n{table}\n\n{summary}; written by `scripts/support_table.py` from "
            f"tests/test_arch_matrix.py (details: docs/support.md).\n{END}"
        )
        out[readme] = pre + section + post
    return out


def write(data: dict[str, dict]) -> None:
    files = render(data)
    for path, text in files.items():
        path.write_text(text)
    if ROOT / "README.md" not in files:
        print("README.md has no support-table markers: only docs/support.md written")
    table, _, counts = tables(data)
    print(table)
    print(_summary(data, counts))


_VERSIONS = re.compile(r" Versions: [^\n]*")


def check(data: dict[str, dict]) -> int:
    """0 when the committed files say what `data` says (versions aside), else 1 with a diff."""
    status = 0
    for path, want in render(data).items():
        have = path.read_text() if path.exists() else ""
        if _VERSIONS.sub("", have) == _VERSIONS.sub("", want):
            if have != want:
                print(
                    f"note: {path.relative_to(ROOT)} names other installed versions (not checked)"
                )
            continue
        status = 1
        name = str(path.relative_to(ROOT))
        sys.stdout.writelines(
            difflib.unified_diff(
                have.splitlines(keepends=True),
                want.splitlines(keepends=True),
                f"{name} (committed)",
                f"{name} (from the matrix results)",
            )
        )
    if status:
        print(
            "\nThe support table differs from this run's matrix results: regenerate it with "
            "`python scripts/support_table.py` (or --from DIR) and commit it."
        )
    return status


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="folder", type=Path, help="read results from this folder")
    ap.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 with a diff if docs/support.md or the README section differ",
    )
    args = ap.parse_args(argv)
    if args.check and args.folder is None:
        ap.error("--check needs --from DIR (the results of a test run)")
    if args.folder is not None:
        data = load(args.folder)
        if args.check:
            missing = [f"arch_matrix_{l}.json" for l in VENVS if l not in data]
            if missing:  # a partial table would differ for the wrong reason
                sys.exit(f"--check: {', '.join(missing)} missing in {args.folder} (run both legs)")
            sys.exit(check(data))
        write(data)
        return
    with tempfile.TemporaryDirectory(prefix="steerlin-matrix-") as tmp:
        run_matrix(Path(tmp))
        write(load(Path(tmp)))


if __name__ == "__main__":
    main()
