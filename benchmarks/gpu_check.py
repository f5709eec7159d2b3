"""A GPU run, ready: the whole path in bfloat16 on a device, checked against CPU float64.

    python benchmarks/gpu_check.py                          # CUDA: 1B+ random model + Gemma-3-270m
    python benchmarks/gpu_check.py --device cpu --tiny      # two tiny random models, seconds

On each case, a bfloat16 model on `--device` runs load -> directions -> exact gains -> fit (d=4)
-> calibrate (`Controller.calibrate`, the default regime) -> greedy generation under
`controller.apply`, each step timed (CUDA synchronised). The reference is the same path on the
CPU in float64 on the *same* weights (the bf16 values copied into a float64 model), so the
tolerances are those of tests/test_bf16.py for "the same bf16-rounded weights":

- exact gains along shared directions: relative to the largest gain <= SAME (1e-5 on the CPU,
  1e-4 on CUDA, test_bf16's GPU float32 bound);
- the fit's gains <= 10 x SAME (the basis choice amplifies round-off); its exact gains <= SAME;
- the calibrated multiplier of the reference's schedule measured on both models: rel <= 10 x SAME;
- greedy tokens under each run's own calibrated controller: every token the device chose is the
  reference's argmax, or within ROUNDING (2e-2, 5 x bf16's 2^-8) of the largest |logit| of the
  reference's logit there (teacher-forced, steered from the last prompt token on: the same
  positions as cached generation), i.e. a near tie that bf16 arithmetic may break either way.
  Exact matches are reported beside it.
The directions the device computes from its own bf16 capture are reported, not checked (a
class-mean difference of random prompts amplifies bf16 rounding).

Cases: `--device cuda` (default): "llama-3.2-1b" (the Llama-3.2-1B shape of
benchmarks/bench_scale.py, 1.5B parameters as TransformerLens unties them, random weights) and
the offline Gemma-3-270m (`load_model("gemma-3-270m")`); then `pytest tests/test_device.py`'s
CUDA cases in a subprocess. `--tiny`: a tiny Llama-like and a tiny Gemma-like random model.
`--skip large,gemma,pytest` drops parts. Writes benchmarks/results/gpu_check[_<device>][_tiny].json
and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROUNDING = 2e-2
SAME = {"cpu": 1e-5, "cuda": 1e-4}

TINY = {
    "tiny-llama": dict(
        n_layers=4, d_model=64, d_head=16, n_heads=4, n_key_value_heads=2, d_mlp=128,
        d_vocab=300, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=16, rotary_base=10000, rotary_adjacent_pairs=False, final_rms=True,
        gated_mlp=True,
    ),
    "tiny-gemma": dict(
        n_layers=4, d_model=64, d_head=16, n_heads=4, n_key_value_heads=1, d_mlp=96,
        d_vocab=300, act_fn="gelu_pytorch_tanh", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=16, rotary_base=1000000,
        rotary_base_local=10000, gated_mlp=True, final_rms=True,
        use_normalization_before_and_after=True, use_qk_norm=True, use_local_attn=True,
        window_size=8, attn_types=["local", "global"] * 2, use_attn_scale=True,
    ),
}  # fmt: skip
TEXTS = [
    "A wonderful, moving film",
    "The plot was dull and the acting worse.",
    "I loved every minute of it!",
    "A tedious, pointless mess",
    "Charming and funny throughout.",
    "Boring. I left early!",
    "A delight from start to finish",
    "Two hours I will never get back.",
]


# ----------------------------------------------------------------------------- models


def tiny_model(name: str, dtype):
    import torch
    from bench_scale import word_tokenizer
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from steerlin.loading.common import _finalize, _quiet_tl

    cfg = HookedTransformerConfig(
        **TINY[name], n_ctx=64, dtype=dtype, seed=0, device="cpu", model_name=name
    )
    with _quiet_tl():
        model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than default weights: visibly non-linear maps
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_((torch.randn(p.shape, generator=g) * 0.15).to(dtype))
    model.set_tokenizer(word_tokenizer(cfg.d_vocab), default_padding_side="right")
    return _finalize(model)


def make_case(name: str, dtype):
    """(model on the CPU in `dtype`, concept texts, labels, operating texts, stems)."""
    import torch

    if name == "gemma-3-270m":
        from steerlin import load_model
        from steerlin.steer_eval import neutral_stems

        model = load_model("gemma-3-270m", dtype=dtype)
        stems = neutral_stems()["calibration"][:4]
        return model, TEXTS, [1, 0] * 4, TEXTS[::-1], stems
    from bench_scale import build, texts_of

    if name in TINY:
        model = tiny_model(name, dtype)
    else:  # a bench_scale shape in bf16 (built in bf16: its weights are bf16 values)
        model = build(name, "bfloat16")
        model = model if dtype == torch.bfloat16 else None
    V = 300 if name in TINY else 32000
    return (model, texts_of(8, 12, V, 1), [0, 1] * 4, texts_of(8, 12, V, 2), texts_of(4, 6, V, 3))


def float64_copy(name: str, half):
    """A float64 model with `half`'s (bf16) weights: the reference on the same values."""
    import torch

    if name == "gemma-3-270m":
        from steerlin import load_model

        ref = load_model("gemma-3-270m", dtype=torch.float64)
    elif name in TINY:
        ref = tiny_model(name, torch.float64)
    else:
        from bench_scale import build

        ref = build(name, "float64")
    with torch.no_grad():
        for (n1, p64), (n2, ph) in zip(
            ref.named_parameters(), half.named_parameters(), strict=True
        ):
            assert n1 == n2 and p64.shape == ph.shape, (n1, n2)
            p64.copy_(ph.to(device="cpu", dtype=torch.float64))
    return ref


# ----------------------------------------------------------------------------- the path


class Clock:
    def __init__(self, device: str) -> None:
        self.device, self.times = device, {}

    def __call__(self, name: str, fn):
        import torch

        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        self.times[name] = time.perf_counter() - t0
        C.say(f"    {name}: {self.times[name]:.2f} s")
        return out


def run_path(model, case, device: str, dirs_ref=None) -> dict:
    """directions, exact gains, fit, calibrate, greedy generation under apply; timed."""
    import torch

    from steerlin import ConceptDirections, Controller, Surrogate, exact_gains

    _, concept, labels, operating, stems = case
    clock = Clock(device)
    dirs_own = clock("directions", lambda: ConceptDirections.fit(model, concept, labels))
    dirs = dirs_ref if dirs_ref is not None else dirs_own
    exact = clock("exact_gains", lambda: exact_gains(model, operating, dirs))
    sur = clock("fit", lambda: Surrogate.fit(model, operating, directions=dirs, d=4))
    ctrl = clock("calibrate", lambda: Controller(sur, 1.0).calibrate(model, stems))
    toks = model.to_tokens(stems).to(model.cfg.device)

    def gen():
        with ctrl.apply(model), torch.no_grad():
            return model.generate(toks, max_new_tokens=8, do_sample=False, stop_at_eos=False,
                                  verbose=False)  # fmt: skip

    out = clock("generate", gen)
    return {
        "dirs": dirs_own, "exact": exact, "sur": sur, "ctrl": ctrl, "tokens": out.cpu(),
        "plen": int(toks.shape[1]), "times": clock.times,
    }  # fmt: skip


def steered_logits(model, tokens, schedule, plen: int):
    """Teacher-forced logits with `schedule` from the last prompt token on (as cached
    generation steers), on the CPU in float64."""
    import torch

    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=schedule.hooks(model, positions=("from", plen - 1))),
    ):
        return model(tokens.to(model.cfg.device)).to("cpu", torch.float64)


def _rel(a, b) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max())


def compare(ref_model, dev_model, ref: dict, dev: dict, case, device: str) -> dict:
    from steerlin.measure import calibrate

    same = SAME["cuda" if device.startswith("cuda") else "cpu"]
    _, _, _, operating, stems = case
    checks = {}

    def check(name, value, tol):
        checks[name] = {"value": value, "tol": tol, "ok": bool(value <= tol)}

    check("exact_gains", _rel(dev["exact"], ref["exact"]), same)
    check("fit_gains", _rel(dev["sur"].gains, ref["sur"].gains), 10 * same)
    check("fit_gains_exact", _rel(dev["sur"].gains_exact, ref["sur"].gains_exact), same)
    sched = ref["ctrl"].schedule  # the reference's (uncalibrated) schedule, on both models
    target = float(ref["ctrl"].target[0])  # raw readout units
    m_ref = calibrate(ref_model, stems, sched, target)
    m_dev = calibrate(dev_model, stems, sched, target)
    check("multiplier", abs(m_dev.multiplier / m_ref.multiplier - 1), 10 * same)
    own = abs(dev["ctrl"].calibration.multiplier / ref["ctrl"].calibration.multiplier - 1)
    # greedy tokens: each device token the reference's argmax or a near tie there
    logits = steered_logits(ref_model, dev["tokens"], ref["ctrl"].calibrated, dev["plen"])
    p, new = dev["plen"], dev["tokens"][:, dev["plen"] :]
    lg = logits[:, p - 1 : -1]  # the logits that chose each new token
    chosen = lg.gather(-1, new[..., None])[..., 0]
    gap = (lg.max(-1).values - chosen) / lg.abs().amax(-1)
    check("greedy_tokens_near_tie", float(gap.max()), ROUNDING)
    return {
        "checks": checks,
        "own_multiplier_rel_diff": own,
        "greedy_exact_match": float((dev["tokens"] == ref["tokens"]).double().mean()),
        "greedy_same_as_reference": bool((dev["tokens"] == ref["tokens"]).all()),
        "directions_unit_rel_diff": _rel(dev["dirs"].unit, ref["dirs"].unit),
    }


def run_case(name: str, device: str) -> dict:
    import torch

    C.say(f"case {name}: bf16 model, float64 reference")
    t0 = time.perf_counter()
    case = make_case(name, torch.bfloat16)
    half = case[0]
    load_s = time.perf_counter() - t0
    ref_model = float64_copy(name, half)
    C.say("  reference (CPU, float64)")
    ref = run_path(ref_model, case, "cpu")
    C.say(f"  device ({device}, bfloat16)")
    t0 = time.perf_counter()
    dev_model = half.to(device)
    move_s = time.perf_counter() - t0
    dev = run_path(dev_model, case, device, dirs_ref=ref["dirs"])
    out = compare(ref_model, dev_model, ref, dev, case, device)
    n = sum(p.numel() for p in half.parameters())
    out.update(params=n, n_layers=half.cfg.n_layers, load_s=load_s, to_device_s=move_s,
               times_device=dev["times"], times_reference_cpu_f64=ref["times"])  # fmt: skip
    out["ok"] = all(c["ok"] for c in out["checks"].values())
    del dev_model, ref_model, half
    if device.startswith("cuda"):
        out["cuda_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    for k, c in out["checks"].items():
        C.say(f"  {k}: {c['value']:.2e} (tol {c['tol']:.0e}) {'ok' if c['ok'] else 'FAILED'}")
    return out


def run_pytest(device: str) -> dict:
    """tests/test_device.py's cases for `device` (the CUDA ones skip without a GPU)."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_device.py", "-k", device]
    C.say("pytest: " + " ".join(cmd[1:]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"command": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": time.perf_counter() - t0,
            "tail": tail, "ok": proc.returncode == 0}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="two tiny random models (seconds)")
    p.add_argument("--skip", default="", help="comma list of: large, gemma, pytest")
    p.add_argument("--large", default="llama-3.2-1b", help="bench_scale shape of the 1B+ case")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on cpu, all on cuda)",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path")
    args = p.parse_args(argv)
    import torch

    cuda = args.device.startswith("cuda")
    C.set_threads(args.threads or ((os.cpu_count() or 1) if cuda else 1))
    skip = {s for s in args.skip.split(",") if s}
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; use --device cpu", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.tiny:
        cases = list(TINY)
    else:
        cases = [c for c, k in ((args.large, "large"), ("gemma-3-270m", "gemma")) if k not in skip]
    env = C.environment(argparse.Namespace(quick=args.tiny))
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(args.device)
    result = {"device": args.device, "dtype": "bfloat16", "reference": "cpu float64",
              "tolerances": {"same": SAME, "rounding": ROUNDING}, "cases": {}}  # fmt: skip
    for name in cases:
        result["cases"][name] = run_case(name, args.device)
    if "pytest" not in skip and not args.tiny:
        result["pytest_test_device"] = run_pytest(args.device.split(":")[0])
    ok = all(c["ok"] for c in result["cases"].values())
    ok = ok and result.get("pytest_test_device", {}).get("ok", True)
    result["ok"] = ok
    dev = args.device.replace(":", "")
    name = (
        "gpu_check" + ("" if dev.startswith("cuda") else f"_{dev}") + ("_tiny" if args.tiny else "")
    )
    out = args.out or C.RESULTS / f"{name}.json"
    C.write_results(name, argparse.Namespace(out=out, quick=False), env, result)
    print(f"gpu_check: {'all checks passed' if ok else 'A CHECK FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
