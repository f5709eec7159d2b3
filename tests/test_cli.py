"""steerlin.cli: help for every subcommand, the no-overwrite rule, option parsing, and end-to-end
runs on a tiny random model (through the CLI's resolve_model / encode_prompts seams) and, marked
gemma, on the offline Gemma-3-270m."""

from __future__ import annotations

import json
import math

import pytest
import scipy.stats
import torch
from conftest import TL4, make_gemma_like

from steerlin import cli, exact_gains
from steerlin.directions import ConceptDirections
from steerlin.report import layers_str
from steerlin.schedule import Schedule
from steerlin.surrogate import Surrogate

SUBCOMMANDS = [
    "demo",
    "fit",
    "scan",
    "control",
    "generate",
    "reproduce",
    "scaling",
    "ablate",
    "steer-eval",
]
GLOBAL_OPTIONS = [
    "--model",
    "--threads",
    "--cache-dir",
    "--dtype",
    "--seed",
    "--batch-size",
    "--out",
    "--overwrite",
]
TINY_SIZES = ["--n-concept", "8", "--n-operating", "5", "--n-eval", "5", "--no-progress"]


# ------------------------------------------------------------------ parsing and output folders


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main([name, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: steerlin {name}" in out
    for opt in GLOBAL_OPTIONS:
        assert opt in out, f"{name} --help lacks {opt}"


def test_missing_required_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["fit"])
    assert ei.value.code == 2
    assert "--task" in capsys.readouterr().err


def test_prepare_out_never_overwrites(tmp_path, capsys):
    base = tmp_path / "run"
    assert cli.prepare_out(base) == base and base.is_dir()  # new folder
    assert cli.prepare_out(base) == base  # exists but empty: reused
    (base / "results.json").write_text("{}")
    first = cli.prepare_out(base)
    assert first == tmp_path / "run-1" and first.is_dir()
    assert "writing to" in capsys.readouterr().out
    (first / "x").write_text("")
    assert cli.prepare_out(base) == tmp_path / "run-2"
    # --overwrite reuses the folder as is
    assert cli.prepare_out(base, overwrite=True) == base
    assert (base / "results.json").read_text() == "{}"
    (tmp_path / "file").write_text("")
    with pytest.raises(cli.CliError, match="not a folder"):
        cli.prepare_out(tmp_path / "file")


def test_parse_layers_and_helpers():
    assert cli.parse_layers("2-5,9") == [2, 3, 4, 5, 9]
    assert cli.parse_layers("3, 1,1") == [1, 3]
    assert cli.parse_layers(None) is None
    with pytest.raises(cli.CliError, match="0..17"):
        cli.parse_layers("2-18", 18)
    with pytest.raises(cli.CliError, match="expected"):
        cli.parse_layers("a-b")
    assert layers_str([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert cli.jsonable({"a": torch.tensor([1.0, math.inf]), "b": (1, float("nan"))}) == {
        "a": [1.0, "inf"],
        "b": [1, "nan"],
    }
    table = cli.md_table([{"x": 1.23456, "y": "a|b"}], [("x", "X", ".2f"), ("y", "Y", "")])
    assert table.splitlines() == ["| X | Y |", "|---|---|", "| 1.23 | a\\|b |"]


def test_steerlin_errors_exit_2(tmp_path, capsys):
    rc = cli.main(["scan", "--fit-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "steerlin scan: error: --fit-dir" in capsys.readouterr().err


# ------------------------------------------------------------------ tiny model end to end


def _encode(model, texts):
    """Deterministic word-hash token ids: the tiny model has no tokenizer."""
    return [
        [(sum(map(ord, w)) * 7 + len(w)) % model.cfg.d_vocab for w in t.split()][:40] or [1]
        for t in texts
    ]


@pytest.fixture
def tiny_cli(monkeypatch):
    """The CLI wired to a tiny float64 Gemma-like model; "broken" fails to load."""
    model = make_gemma_like()
    threads = torch.get_num_threads()

    def resolve(name, **kw):
        if name == "broken":
            raise OSError("no such model")
        return model

    monkeypatch.setattr(cli, "resolve_model", resolve)
    monkeypatch.setattr(cli, "encode_prompts", _encode)
    yield model
    torch.set_num_threads(threads)


def _results(folder):
    doc = json.loads((folder / "results.json").read_text())
    assert {"command", "config", "versions", "timings", "results"} <= set(doc)
    assert (folder / "results.md").read_text().startswith("# steerlin")
    return doc


def _check_scan(model, fit, *, rtol_exact, scan_rel):
    """What `steerlin scan` reported, against an independent recomputation from the saved fit.

    exact: equals `exact_gains` on the fit's eval split (catches a wrong split, directions
    file or readout). predicted: the saved surrogate's gains. fidelity rows: the Spearman of
    the reported curves (scipy), so the table says what the curves say. measured (the ±ε
    scan): close to the exact first-order gains, per layer within `scan_rel` of the largest
    gain where given (a smooth float64 model), and ranked like them (Spearman > 0.9).
    """
    res = _results(fit / "scan")["results"]
    measured, exact, predicted = (
        torch.tensor(res[key], dtype=torch.float64) for key in ("measured", "exact", "predicted")
    )
    dirs = ConceptDirections.load(fit / "directions.safetensors", model)
    sur = Surrogate.load(fit / "surrogate.safetensors", model)
    texts = json.loads((fit / "splits.json").read_text())["eval"]["texts"]
    ev = cli.encode_prompts(model, texts)
    ref = exact_gains(model, ev, dirs, readout=sur.meta["readout"]["kind"], **_label_words(sur))
    assert torch.allclose(exact, ref, rtol=rtol_exact, atol=rtol_exact * ref.abs().max())
    assert torch.allclose(predicted, sur.gains.to(torch.float64))
    rows = {r["variant"]: r for r in res["fidelity"]}
    for variant, curve in (("per-prompt", predicted), ("exact (eval)", exact)):
        want = scipy.stats.spearmanr(curve.numpy(), measured.numpy()).statistic
        assert rows[variant]["e2e_spearman"] == pytest.approx(want, abs=1e-12), variant
    assert rows["exact (eval)"]["e2e_spearman"] > 0.9
    if scan_rel is not None:
        err = (measured - exact).abs().max() / exact.abs().max()
        assert err < scan_rel, (measured, exact)


def _label_words(sur):
    rd = sur.meta["readout"]
    if rd.get("kind") != "logits":
        return {}
    return {"label_words": [rd["pos_token"], rd["neg_token"]]}


def test_tiny_fit_scan_control(tiny_cli, tmp_path):
    fit = tmp_path / "fit"
    argv = ["fit", "--task", "demo", "--d", "4", "--out", str(fit), *TINY_SIZES]
    assert cli.main(argv) == 0
    doc = _results(fit)
    assert len(doc["results"]["gains"]) == tiny_cli.cfg.n_layers
    assert doc["config"]["model"] == "gemma-3-270m" and doc["config"]["dtype"] == "float32"
    sur = Surrogate.load(fit / "surrogate.safetensors", tiny_cli)
    assert sur.d == 4
    # the fit's own reduction check, against the exact gains its observability pass computed
    assert doc["results"]["gains_exact"] == pytest.approx(sur.gains_exact.tolist(), rel=1e-12)
    assert doc["results"]["reduction"]["raw_spearman"] == pytest.approx(
        sur.reduction_error().raw_spearman, abs=1e-12
    )
    ConceptDirections.load(fit / "directions.safetensors", tiny_cli)
    splits = json.loads((fit / "splits.json").read_text())
    assert len(splits["eval"]["texts"]) == 10 and sorted(set(splits["eval"]["labels"])) == [0, 1]

    # the same command again goes to fit-1, never over the first run
    assert cli.main(argv) == 0
    assert (tmp_path / "fit-1" / "surrogate.safetensors").is_file()

    assert cli.main(["scan", "--fit-dir", str(fit), "--no-progress"]) == 0
    scan = _results(fit / "scan")
    variants = {r["variant"] for r in scan["results"]["fidelity"]}
    assert variants == {"per-prompt", "paper", "exact (eval)"}
    assert (fit / "scan" / "gains.png").stat().st_size > 1000
    # measured 0.004 (TL3 tiny model), 0.022 (TL4: another random model, a bridge over HF Gemma-3)
    _check_scan(tiny_cli, fit, rtol_exact=1e-10, scan_rel=0.03 if TL4 else 0.02)

    assert cli.main(["control", "--fit-dir", str(fit), "--target", "0.3", "--layers", "1-3"]) == 0
    ctl = _results(fit / "control")
    assert [r["strategy"] for r in ctl["results"]["energy"]][:3] == ["llv", "uniform", "last"]
    sched = Schedule.load(fit / "control" / "schedule.safetensors", tiny_cli)
    assert sched.layers == [1, 2, 3]
    assert sched.predicted_shift == pytest.approx(0.3)

    # calibrated on the model, default target (half the separation recorded by fit)
    out = tmp_path / "cal"
    rc = cli.main(f"control --fit-dir {fit} --calibrate --baselines uniform --out {out}".split())
    assert rc == 0
    rows = _results(out)["results"]["energy"]
    assert [r["strategy"] for r in rows] == ["llv", "uniform"]
    assert rows[0]["ratio_to_llv"] == 1.0
    assert (out / "energy.png").is_file() and (out / "schedule.png").is_file()
    target = json.loads((fit / "results.json").read_text())["results"]["separation"]
    assert rows[0]["measured_shift"] == pytest.approx(target["half_separation"], rel=2e-3)


def test_tiny_demo_without_generation(tiny_cli, tmp_path):
    out = tmp_path / "demo"
    argv = f"demo --d 4 --no-generate --n-random 2 --threads 1 --out {out}".split()
    rc = cli.main(argv + TINY_SIZES)
    assert rc == 0
    doc = _results(out)
    for name in ("gains.png", "energy.png", "schedule.png", "surrogate.safetensors"):
        assert (out / name).is_file(), name
    t = doc["results"]["target"]
    assert t["target"] == pytest.approx(0.5 * (t["mean_label1"] - t["mean_label0"]))
    assert "Target: 0.5" in (out / "results.md").read_text()


def test_tiny_reproduce_scaling_ablate(tiny_cli, tmp_path):
    argv = f"reproduce --tasks demo --d 4 --n-random 1 --out {tmp_path / 'rep'}".split()
    rc = cli.main(argv + TINY_SIZES)
    assert rc == 0
    rep = _results(tmp_path / "rep")
    assert {r["readout"] for r in rep["results"]["fidelity"]} == {"concept"}  # no tokenizer
    assert (tmp_path / "rep" / "gains_demo.png").is_file()
    assert (tmp_path / "rep" / "energy_demo.png").is_file()

    argv = f"scaling --models tiny,broken --task demo --d 2,L+1 --out {tmp_path / 'sc'}".split()
    rc = cli.main(argv + TINY_SIZES)
    assert rc == 0
    rows = _results(tmp_path / "sc")["results"]["rows"]
    assert rows[-1]["model"] == "broken" and "OSError" in rows[-1]["error"]
    assert rows[0]["params"] == sum(p.numel() for p in tiny_cli.parameters())
    L = tiny_cli.cfg.n_layers
    sur_rows = [r for r in rows if r.get("variant") in ("per-prompt", "paper")]
    assert {r["d"] for r in sur_rows} == {2, L + 1}
    # d = L + 1 realises the mean model: the paper variant is exact against the operating
    # split's exact gains up to the model's own non-linearity (none: first-order both sides)
    full = [r for r in sur_rows if r["d"] == L + 1 and r["variant"] == "paper"]
    assert full and all(r["red_rel_err_median"] < 0.5 for r in full), full
    assert (tmp_path / "sc" / "scaling.png").is_file()

    argv = "ablate --d 2,4 --eps 0.05,0.2 --basis krylov,random --d-ref 4 --task demo".split()
    rc = cli.main([*argv, "--out", str(tmp_path / "ab"), *TINY_SIZES])
    assert rc == 0
    rows = _results(tmp_path / "ab")["results"]["rows"]
    d_rows = {(r["basis"], r["d"]) for r in rows if r["sweep"] == "d"}
    assert d_rows == {(b, d) for b in ("krylov", "random") for d in (2, 4)}
    eps_rows = {(r["basis"], r["eps"]) for r in rows if r["sweep"] == "eps"}
    assert eps_rows == {(b, e) for b in ("krylov", "random") for e in (0.05, 0.2)}
    lin = _results(tmp_path / "ab")["results"]["linearity"]
    per_layer = [r for r in lin if isinstance(r["layer"], int)]
    assert len(per_layer) == tiny_cli.cfg.n_layers
    # the tiny model is smooth: a 5% step is close to the exact first-order gain at every layer
    assert all(abs(r["r0.05"] - 1) < 0.1 for r in per_layer if abs(r["exact"]) > 1e-3), per_layer
    assert (tmp_path / "ab" / "ablation_d.png").is_file()
    assert (tmp_path / "ab" / "ablation_eps.png").is_file()


# ------------------------------------------------------------------ the real model


@pytest.mark.gemma
def test_gemma_fit_scan_control_generate(gemma, monkeypatch, tmp_path, capsys):
    """The real pipeline at tiny sizes on Gemma-3-270m, in process (model loaded once)."""
    monkeypatch.setattr(cli, "resolve_model", lambda name, **kw: gemma)
    threads = torch.get_num_threads()
    fit = tmp_path / "fit"
    sizes = ["--n-concept", "8", "--n-operating", "4", "--n-eval", "4", "--no-progress"]
    try:
        assert cli.main(["fit", "--task", "demo", "--d", "4", "--out", str(fit), *sizes]) == 0
        assert cli.main(["scan", "--fit-dir", str(fit), "--no-progress"]) == 0
        # the reported numbers are recomputed independently from the saved fit (fp32 model)
        _check_scan(gemma, fit, rtol_exact=1e-4, scan_rel=None)
        gguf = tmp_path / "cv.gguf"
        argv = f"control --fit-dir {fit} --baselines uniform --llama-cpp {gguf} --calibrate"
        rc = cli.main(argv.split())
        assert rc == 0
        sched = Schedule.load(fit / "control" / "schedule.safetensors", gemma)
        assert min(sched.layers) >= 2 and gguf.stat().st_size > 0
        capsys.readouterr()
        sched_file = fit / "control" / "schedule.safetensors"
        argv = f"generate --schedule {sched_file} --max-new-tokens 4 --scale -3".split()
        rc = cli.main([*argv, "--prompt", "The movie was"])
        assert rc == 0
        out = capsys.readouterr().out
        assert "unsteered:" in out and "steered  :" in out
        gen = _results(fit / "control" / "generate")["results"]["samples"]
        assert gen[0]["prompt"] == "The movie was" and gen[0]["unsteered"]
    finally:
        torch.set_num_threads(threads)


def test_steer_eval_summary_and_table():
    """Δ(+,−), perplexity ratios and seeds from raw rows (no model): what the table reports."""
    from steerlin.steer_eval import format_table, summarise

    base = {"strategy": "unsteered", "t": 0.0, "ppl": [2.0, 4.0]}
    row = lambda t, j, p: {
        "strategy": "min-norm",
        "t": t,
        "judge": j,
        "readout": [t, t],
        "ppl": p,
        "kl": [0.1, 0.3],
        "energy_norm": 1.0,
        "energy_raw": 2.0,
        "kl_pred": 0.05,
        "multiplier": 1.0,
    }
    res = {"rows": [base, row(1.0, [0.5, 0.7], [2.2, 4.0]), row(-1.0, [-0.1, 0.1], [3.0, 4.4])]}
    (s,) = summarise(res)
    assert s["delta"] == pytest.approx(0.6) and s["delta_sd"] == pytest.approx(0.0, abs=1e-12)
    assert s["ppl_plus"] == pytest.approx((1.1 + 1.0) / 2)
    assert s["ppl_minus"] == pytest.approx((1.5 + 1.1) / 2)
    assert s["kl"] == pytest.approx(0.2) and s["n_seeds"] == 2
    table = format_table([s], "vader")
    assert "(2 seeds)" in table and "+0.600 ± 0.000" in table
    one = summarise(
        {
            "rows": [
                {**base, "ppl": [2.0]},
                *(
                    {**r, "judge": r["judge"][:1], "readout": r["readout"][:1], "ppl": r["ppl"][:1]}
                    for r in res["rows"][1:]
                ),
            ]
        }
    )
    table1 = format_table(one, "vader")
    assert "(1 seeds)" in table1 and "| +0.600 | +2.00 |" in table1  # no spread from one seed


@pytest.mark.gemma
def test_gemma_steer_eval_quick(gemma, monkeypatch, tmp_path):
    """`steerlin steer-eval --quick` on SST-2: calibrated min-norm and min-KL schedules, judged
    by VADER, with perplexity and KL beside them; + steers VADER above − for min-norm."""
    pytest.importorskip("vaderSentiment")
    from conftest import require_shared_data

    data = require_shared_data()
    monkeypatch.setattr(cli, "resolve_model", lambda name, **kw: gemma)
    threads = torch.get_num_threads()
    out = tmp_path / "se"
    try:
        argv = ["steer-eval", "--quick", "--tasks", "sst2", "--data-dir", str(data)]
        assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((out / "steer_eval.json").read_text())["tasks"]["sst2"]
    rows = {(r["strategy"], r["t"]): r for r in res["rows"]}
    assert {("min-norm", 1.0), ("min-norm", -1.0), ("min-kl", 1.0), ("min-kl", -1.0)} <= set(rows)
    plus, minus = rows[("min-norm", 1.0)], rows[("min-norm", -1.0)]
    assert sum(plus["judge"]) > sum(minus["judge"])  # the intended direction, judged outside
    for r in (plus, minus):
        assert all(p > 1.0 for p in r["ppl"]) and all(k > 0 for k in r["kl"])
        assert abs(r["multiplier"]) > 0
    assert "| min-norm | 1 |" in (out / "results.md").read_text()
    assert (out / "steer_eval_sst2_quick.png").stat().st_size > 1000


def test_tiny_demo_steers_both_ways_and_judges_each_line(monkeypatch, tmp_path, capsys):
    """The demo's generation step: +t and −t, each calibrated, every line judged by VADER,
    the perplexity ratio reported; the steered continuations differ from the unsteered."""
    pytest.importorskip("vaderSentiment")
    from _wordtok import with_tokenizer

    model = with_tokenizer(make_gemma_like())
    monkeypatch.setattr(cli, "resolve_model", lambda name, **kw: model)
    threads = torch.get_num_threads()
    out = tmp_path / "demo"
    argv = "demo --d 4 --n-random 2 --threads 1 --max-new-tokens 5 --steer-target 4".split()
    prompts = ["--prompt", "the movie was", "--prompt", "the plot is not"]
    try:
        assert cli.main([*argv, *prompts, "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    gen = _results(out)["results"]["generation"]
    assert gen["strength"] == 4.0 and len(gen["signs"]) == 2
    for rec in gen["signs"].values():
        assert rec["ppl_ratio"] > 0 and rec["changed"] >= 1
    assert set(gen["vader_mean"]) == {"unsteered", *gen["signs"]}
    printed = capsys.readouterr().out
    assert printed.count("[VADER ") == 3 * 2  # unsteered, +t, −t for each of the 2 prompts
    assert "Steered both ways" in (out / "results.md").read_text()


def test_progress_bars_only_on_a_terminal(monkeypatch):
    """No flag: bars when stderr is a terminal, none when it is redirected; the flags win."""
    import io

    parser = cli.build_parser()
    for tty, argv, want in [
        (False, [], False),
        (True, [], True),
        (False, ["--progress"], True),
        (True, ["--no-progress"], False),
    ]:
        err = io.StringIO()
        err.isatty = lambda tty=tty: tty
        monkeypatch.setattr("sys.stderr", err)
        args = parser.parse_args(["demo", *argv])
        cli._resolve_progress(args)
        assert args.progress is want, (tty, argv)
