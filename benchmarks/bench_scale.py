"""Cost as the model grows: random-weight models with the real shapes of public models.

    python benchmarks/bench_scale.py                      # the default workload (see below)
    python benchmarks/bench_scale.py --n 100 --tokens 64 --stems 12 --gen-tokens 20  # issue 33
    python benchmarks/bench_scale.py --report             # table, cost model, plot from results
    python benchmarks/bench_scale.py --quick              # smoke run (two small shapes)

Each (shape, dtype, threads) runs in a fresh interpreter: a TransformerLens 3
`HookedTransformer` built from the `HookedTransformerConfig` fields TransformerLens's own
conversion gives that checkpoint (typed in below from the public configs; nothing downloaded;
`n_ctx` cut to 2048: it sizes only the rotary tables and masks), random weights (TransformerLens's
init; Qwen2's q/k/v biases random too), `W_U` stored transposed as `load_model` does, and a
word-level tokenizer whose word ``w<i>`` is token i (so text prompts, the regime's greedy
continuations and `Controller.calibrate` run as on a real model). Then, in order:

    directions   ConceptDirections.fit on --n concept prompts (labels 0/1 alternating)
    exact        exact_gains on --n operating prompts of --tokens tokens
    fit          Surrogate.fit(d=8) (the default two-sided basis) on the same prompts
    scan         scan_gains (cached) on the same prompts
    calibrate    Controller(sur, 1.0).calibrate(model, stems) (default regime: 8 greedy tokens)
    generate     --stems stems x --gen-tokens greedy tokens, plain vs under `controller.apply`,
                 interleaved ABBA (--gen-reps pairs); overhead = median steered / median plain - 1

Per stage: wall and process CPU seconds, full-model token-forwards counted at the first block's
input (steerlin.steer_eval.ForwardCounter: padding and KV-cached steps included) plus the
single-token chain's block-token work from the algorithm's structure (exact 3L, fit L(d+4),
scan L(L+1) per prompt; docs/performance.md), and the peak VmRSS sampled during the stage
(benchmarks/_common.RssSampler) beside the weights' own bytes. The layer x coefficient search's
cost (steerlin.steer_eval.search_grid: 2(L+1)·|coefs| steered generations of the stems plus one
plain, each scored by one teacher-forced forward) is counted in token-forwards from its
structure, with seconds estimated from the measured generation and scoring times.

Writes benchmarks/results/scale_<shape>_<dtype>_t<threads>.json per run and, with --report
(run at the end of a full run), scale_summary.json, docs/img/cost_scaling.png and the tables.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# ----------------------------------------------------------------------------- the shapes

_LLAMA_LIKE = dict(
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_adjacent_pairs=False,
    final_rms=True,
    gated_mlp=True,
    act_fn="silu",
)

#: HookedTransformerConfig fields as TransformerLens 3's convert_hf_model_config gives them
#: (loading_from_pretrained.py: the Llama, Qwen2 and gemma-3-1b branches) from the public
#: config.json of each checkpoint. Tied embeddings are untied by TransformerLens (W_E, W_U).
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(  # HuggingFaceTB/SmolLM2-135M (LlamaForCausalLM)
        _LLAMA_LIKE,
        d_model=576,
        d_head=64,
        n_heads=9,
        n_key_value_heads=3,
        d_mlp=1536,
        n_layers=30,
        d_vocab=49152,
        eps=1e-5,
        rotary_dim=64,
        rotary_base=100000,
    ),
    "qwen2.5-0.5b": dict(  # Qwen/Qwen2.5-0.5B (Qwen2ForCausalLM)
        _LLAMA_LIKE,
        d_model=896,
        d_head=64,
        n_heads=14,
        n_key_value_heads=2,
        d_mlp=4864,
        n_layers=24,
        d_vocab=151936,
        eps=1e-6,
        rotary_dim=64,
        rotary_base=1000000,
        use_attn_scale=True,
    ),
    "gemma-3-1b": dict(  # google/gemma-3-1b-pt (TransformerLens's gemma-3-1b branch)
        d_model=1152,
        d_head=256,
        n_heads=4,
        n_key_value_heads=1,
        d_mlp=6912,
        n_layers=26,
        d_vocab=262144,
        eps=1e-6,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=256,
        rotary_base=1000000,
        rotary_base_local=10000,
        use_attn_scale=True,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        use_qk_norm=True,
        window_size=512,
        use_local_attn=True,
        attn_types=(["local"] * 5 + ["global"]) * 4 + ["local"] * 2,
    ),
    "llama-3.2-1b": dict(  # meta-llama/Llama-3.2-1B (LlamaForCausalLM, llama3 rope scaling)
        _LLAMA_LIKE,
        d_model=2048,
        d_head=64,
        n_heads=32,
        n_key_value_heads=8,
        d_mlp=8192,
        n_layers=16,
        d_vocab=128256,
        eps=1e-5,
        rotary_dim=64,
        rotary_base=500000,
        use_NTK_by_parts_rope=True,
        NTK_original_ctx_len=8192,
        NTK_by_parts_low_freq_factor=1.0,
        NTK_by_parts_high_freq_factor=4.0,
        NTK_by_parts_factor=32.0,
    ),
    "qwen2.5-1.5b": dict(  # Qwen/Qwen2.5-1.5B (Qwen2ForCausalLM)
        _LLAMA_LIKE,
        d_model=1536,
        d_head=128,
        n_heads=12,
        n_key_value_heads=2,
        d_mlp=8960,
        n_layers=28,
        d_vocab=151936,
        eps=1e-6,
        rotary_dim=128,
        rotary_base=1000000,
        use_attn_scale=True,
    ),
}
#: Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json), for the extrapolation only
LLAMA_8B = dict(d_model=4096, d_head=128, n_heads=32, n_kv=8, d_mlp=14336, n_layers=32,
                d_vocab=128256)  # fmt: skip
N_CTX = 2048
DTYPES = ("float32", "bfloat16")
STAGES = ("directions", "exact", "fit", "scan", "calibrate")


def build(shape: str, dtype: str, seed: int = 0):
    """The random-weight HookedTransformer of `shape` with the word tokenizer attached."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from steerlin.loading.common import _finalize, _quiet_tl, _unembed_layout

    kw = dict(SHAPES[shape])
    cfg = HookedTransformerConfig(
        **kw, n_ctx=N_CTX, dtype=getattr(torch, dtype), seed=seed, device="cpu",
        model_name=f"random-{shape}", original_architecture="LlamaForCausalLM"
        if "gemma" not in shape else "Gemma3ForCausalLM", initializer_range=0.02,
    )  # fmt: skip
    with _quiet_tl():
        model = HookedTransformer(cfg)
    if "qwen" in shape:  # Qwen2's q/k/v projections have biases: give them values
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for blk in model.blocks:
                for name in ("b_Q", "b_K", "b_V"):
                    p = getattr(blk.attn, name)
                    p.copy_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
    model.set_tokenizer(word_tokenizer(cfg.d_vocab), default_padding_side="right")
    return _finalize(_unembed_layout(model))


def word_tokenizer(d_vocab: int):
    """Word ``w<i>`` is token i (i >= 4); 0-3 are <pad>, <s>, </s>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, d_vocab)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )  # fmt: skip
    fast.init_kwargs["name_or_path"] = "steerlin-bench-wordtok"
    fast.init_kwargs["add_bos_token"] = True
    return fast


def texts_of(n: int, n_tokens: int, d_vocab: int, seed: int) -> list[str]:
    """n texts of n_tokens - 1 random words (BOS makes n_tokens)."""
    import random

    rng = random.Random(seed)
    hi = min(d_vocab, 32000) - 1  # common-ish ids; any id is as costly as any other
    return [" ".join(f"w{rng.randint(4, hi)}" for _ in range(n_tokens - 1)) for _ in range(n)]


def param_counts(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embed = model.embed.W_E.numel()
    return {
        "params": total,
        "params_compute": total - embed,  # what a token's forward multiplies (W_U included)
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


# ----------------------------------------------------------------------------- one run (child)


def stage(model, name: str, fn, out: dict, chain: int = 0):
    """Run fn() with timing, the forward-token counter and the RSS sampler; record it."""
    from steerlin.steer_eval import ForwardCounter

    gc.collect()
    C.say(f"  {name} ...")
    with C.RssSampler() as rss, ForwardCounter(model) as fc:
        res, wall, cpu = C.timed(fn)
    L = model.cfg.n_layers
    out[name] = {
        "wall_s": wall,
        "cpu_s": cpu,
        "forward_tokens": fc.tokens,
        "chain_block_tokens": chain,
        "token_forwards": fc.tokens + chain / L,
        **rss.reading(),
    }
    C.say(
        f"  {name}: {wall:.1f} s wall, {fc.tokens} fwd tokens, "
        f"peak {out[name]['peak_vmrss_mib']:.0f} MiB"
    )
    return res


def profiled(fn, top: int = 30) -> list[str]:
    """fn() under cProfile: the top functions by cumulative time, as text lines."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue().splitlines()


def generation(model, ctrl, stems: list[str], n_new: int, reps: int) -> dict:
    """Plain vs steered greedy generation of one batch of stems, interleaved ABBA."""
    import torch

    toks = model.to_tokens(stems)  # equal lengths: no padding

    def gen():
        with torch.no_grad():
            return model.generate(toks, max_new_tokens=n_new, do_sample=False,
                                  stop_at_eos=False, verbose=False)  # fmt: skip

    def steered():
        with ctrl.apply(model):
            return gen()

    gen()  # warm-up
    runs = {"plain": [], "steered": []}
    order = ["plain", "steered", "steered", "plain"] * reps
    outs = {}
    for k in order:
        outs[k], wall, cpu = C.timed(gen if k == "plain" else steered)
        runs[k].append((wall, cpu))
    score_in = outs["plain"]
    _, score_wall, _ = C.timed(lambda: model(score_in, return_type="loss"))
    med = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    medc = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    return {
        "plain_wall_s": med["plain"],
        "steered_wall_s": med["steered"],
        "plain_cpu_s": medc["plain"],
        "steered_cpu_s": medc["steered"],
        "overhead_wall": med["steered"] / med["plain"] - 1,
        "overhead_cpu": medc["steered"] / medc["plain"] - 1,
        "runs": runs,
        "changed_tokens": bool(not torch.equal(outs["plain"], outs["steered"])),
        "tokens_per_generation": int(toks.shape[0]) * (int(toks.shape[1]) + n_new - 1),
        "score_wall_s": score_wall,
        "score_tokens": int(score_in.numel()),
    }


def search_cost(L: int, n_stems: int, stem_tokens: int, n_new: int, gen: dict) -> dict:
    """steer_eval.search_grid's cost on this shape: (2(L+1)|coefs| + 1) generations, each
    scored by one teacher-forced forward of stems + continuations."""
    from steerlin.steer_eval import SEARCH_COEFS

    n_gen = 2 * (L + 1) * len(SEARCH_COEFS) + 1
    gen_tok = n_stems * (stem_tokens + n_new - 1)
    score_tok = n_stems * (stem_tokens + n_new)
    return {
        "generations": n_gen,
        "coefs": list(SEARCH_COEFS),
        "token_forwards": n_gen * (gen_tok + score_tok),
        "seconds_est": n_gen * (gen["plain_wall_s"] + gen["score_wall_s"]),
    }


def child(args) -> None:
    import torch

    from steerlin import ConceptDirections, Controller, Surrogate, exact_gains, scan_gains

    C.set_threads(args.child_threads)
    torch.manual_seed(0)
    out: dict = {
        "shape": args.child_shape,
        "dtype": args.child_dtype,
        "threads": args.child_threads,
    }
    base = C.proc_status_mib().get("VmRSS", 0.0)
    model, wall, cpu = C.timed(lambda: build(args.child_shape, args.child_dtype))
    cfg = model.cfg
    L, n, T, d = cfg.n_layers, args.n, args.tokens, args.d
    out.update(param_counts(model), n_layers=L, d_model=cfg.d_model, d_vocab=cfg.d_vocab)
    out["engine"] = __import__("steerlin.frozen", fromlist=["resolve_engine"]).resolve_engine(model)
    out["build"] = {"wall_s": wall, "cpu_s": cpu, "rss_before_mib": base}
    concept = texts_of(n, T, cfg.d_vocab, seed=1)
    labels = [0, 1] * (n // 2) + [0] * (n % 2)
    operating = texts_of(n, T, cfg.d_vocab, seed=2)
    stems = texts_of(args.stems, args.stem_tokens, cfg.d_vocab, seed=3)
    with torch.no_grad():
        model(model.to_tokens(operating[:2]), return_type=None)
    out["model_alone_rss_mib"] = C.proc_status_mib().get("VmRSS")
    st: dict = {}
    dirs = stage(model, "directions", lambda: ConceptDirections.fit(model, concept, labels), st)
    stage(model, "exact", lambda: exact_gains(model, operating, dirs), st, chain=n * 3 * L)
    sur = stage(
        model, "fit", lambda: Surrogate.fit(model, operating, directions=dirs, d=d), st,
        chain=n * L * (d + 4),
    )  # fmt: skip
    if args.profile_fit:  # a second fit under cProfile: where its time goes
        out["fit_profile"] = profiled(lambda: Surrogate.fit(model, operating, directions=dirs, d=d))
    stage(model, "scan", lambda: scan_gains(model, operating, dirs), st, chain=n * L * (L + 1))
    out["fit_meta"] = {k: v for k, v in sur.meta.items() if isinstance(v, (int, float, str))}
    out["workload"] = workload(args)
    if args.child_threads > 1 and not args.child_all_stages:  # directions, exact, fit, scan
        out["stages"] = st
        C.child_result(out)
        return
    ctrl = stage(model, "calibrate", lambda: Controller(sur, 1.0).calibrate(model, stems), st)
    out["calibrated_multiplier"] = float(ctrl.calibration.multiplier)
    gc.collect()
    with C.RssSampler() as rss:
        gen = generation(model, ctrl, stems, args.gen_tokens, args.gen_reps)
    gen.update(rss.reading())
    out["stages"], out["generate"] = st, gen
    out["search"] = search_cost(L, args.stems, args.stem_tokens, args.gen_tokens, gen)
    C.child_result(out)


def workload(args) -> dict:
    return {"n_concept": args.n, "n_operating": args.n, "tokens": args.tokens, "d": args.d,
            "stems": args.stems, "stem_tokens": args.stem_tokens, "gen_tokens": args.gen_tokens,
            "gen_reps": args.gen_reps}  # fmt: skip


# ----------------------------------------------------------------------------- parent


def runs_of(args) -> list[tuple[str, str, int]]:
    """float32 at every size; the other dtypes at the two smallest sizes; the 2-thread runs;
    then the other dtypes from the largest size down (a run cut short keeps a spread)."""
    shapes = args.shapes.split(",")
    dtypes = args.dtypes.split(",")
    runs = [(s, dtypes[0], 1) for s in shapes]
    runs += [(s, dt, 1) for dt in dtypes[1:] for s in shapes[:2]]
    two = [s for s in (args.two_threads or f"{shapes[0]},{shapes[-1]}").split(",") if s]
    runs += [(s, dtypes[0], 2) for s in two]
    runs += [(s, dt, 1) for dt in dtypes[1:] for s in shapes[2:][::-1]]
    return runs


def result_path(shape: str, dtype: str, threads: int, quick: bool) -> Path:
    sfx = "_quick" if quick else ""
    return C.RESULTS / f"scale_{shape}_{dtype}_t{threads}{sfx}.json"


def main() -> None:
    p = C.parser(__doc__.splitlines()[0], n=16)
    p.add_argument("--tokens", type=int, default=32, help="tokens per prompt incl. BOS (32)")
    p.add_argument("--d", type=int, default=8, help="surrogate order (8)")
    p.add_argument("--stems", type=int, default=6, help="generation / calibration stems (6)")
    p.add_argument("--stem-tokens", type=int, default=8, help="tokens per stem incl. BOS (8)")
    p.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens generated (16)")
    p.add_argument("--gen-reps", type=int, default=1, help="ABBA blocks of generation (1)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of shapes")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--two-threads", default=None, help="shapes run at 2 threads (first,last)")
    p.add_argument("--skip-existing", action="store_true", help="keep runs already written")
    p.add_argument("--report", action="store_true", help="only the report from saved results")
    p.add_argument("--profile-fit", action="store_true", help="add a cProfile of a second fit")
    p.add_argument("--child", action="store_true", help=C.HIDDEN)
    p.add_argument("--child-shape", help=C.HIDDEN)
    p.add_argument("--child-dtype", help=C.HIDDEN)
    p.add_argument("--child-threads", type=int, default=1, help=C.HIDDEN)
    p.add_argument("--child-all-stages", action="store_true", help=C.HIDDEN)
    p.add_argument(
        "--two-threads-all",
        action="store_true",
        help="2-thread runs measure every stage (default: directions, exact, fit, scan)",
    )
    args = p.parse_args()
    if args.quick:
        args.n = args.n or 8
        args.tokens, args.stems, args.gen_tokens = 16, 4, 8
        if args.shapes == ",".join(SHAPES):
            args.shapes = "smollm2-135m,qwen2.5-0.5b"
    args.n = args.n or 16
    if args.child:
        child(args)
        return
    if not args.report:
        env = C.environment(args)
        for shape, dtype, threads in runs_of(args):
            path = result_path(shape, dtype, threads, args.quick)
            if args.skip_existing and path.exists():
                continue
            flags = ["--child-shape", shape, "--child-dtype", dtype, "--child-threads",
                     threads, "--n", args.n, "--tokens", args.tokens, "--d", args.d, "--stems",
                     args.stems, "--stem-tokens", args.stem_tokens, "--gen-tokens",
                     args.gen_tokens, "--gen-reps", args.gen_reps]  # fmt: skip
            flags += ["--profile-fit"] if args.profile_fit else []
            flags += ["--child-all-stages"] if args.two_threads_all else []
            try:
                res, wall = C.run_child(__file__, flags, f"{shape} {dtype} {threads}t")
            except SystemExit as exc:  # one failed run does not stop the others
                C.say(f"FAILED: {shape} {dtype} {threads}t: {exc}")
                continue
            res["process_wall_s"] = wall
            C.write_results(
                path.stem, argparse_ns(path), dict(env, loadavg_start=list(os.getloadavg())), res
            )
    from bench_scale_report import report

    report(quick=args.quick)


def argparse_ns(path: Path):
    import argparse

    return argparse.Namespace(out=path, quick=False)


if __name__ == "__main__":
    main()
