"""The LLV surrogate: a low-order linear model of the last token's depth dynamics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from . import krylov
from .directions import ConceptDirections
from .errors import FileFormatError, InputError, NonFiniteError, ShapeError
from .hooks import check_model
from .jacobians import FrozenContext, Readout, iter_contexts, make_readout
from .persist import check_model_meta, load_tensors, model_meta, save_tensors
from .trajectory import PromptsLike

Basis = Literal["krylov", "pod", "random"]
Variant = Literal["per-prompt", "paper"]
BASES = ("krylov", "pod", "random")
VARIANTS = ("per-prompt", "paper")
DEFAULT_VARIANT: Variant = "per-prompt"
DEFAULT_BASIS: Basis = "krylov"


@dataclass(frozen=True)
class Surrogate:
    """Low-order linear layer-varying (LLV) model of the last token's depth dynamics.

    State-space form, in the basis P_l (H x d, orthonormal, P_l[:, 0] = unit_l):

        x_l ≈ x̄_l + P_l r_l
        r_{l+1} = A[l] r_l + B[l] u_l          (l = 0..L-1, r_0 = 0)
        δy      = c^T r_L

    with A[l] = P_{l+1}^T A_l P_l (A_l the frozen-context Jacobian of block l, averaged over the
    operating prompts), B[l] = P_{l+1}^T A_l unit_l scale_l (so u is in norm-relative units:
    u_l = 0.1 adds 10% of a typical ‖x_l‖ along unit_l) and c = P_L^T ∇_x y (the readout).

    Gains: g_l = dδy/du_l. `variant="paper"` computes them from that single mean model,
    h_l = c^T A[L-1] ... A[l+1] B[l]. `variant="per-prompt"` (default) reduces each operating
    prompt's own Jacobians in the same basis and averages the prompts' gains; the full-model
    gain is a mean over prompts of products of Jacobians, which the product of means is not.

    Stored: P Float[L+1, H, d], A Float[L, d, d], B Float[L, d], c Float[d] (means over the
    operating prompts), `gains` Float[L] (per the variant), `gains_paper` (the single mean
    model's gains, for comparison), `gains_std` (spread of per-prompt gains), all float64.
    """

    P: Float[torch.Tensor, "Lp1 H d"]
    A: Float[torch.Tensor, "L d d"]
    B: Float[torch.Tensor, "L d"]
    c: Float[torch.Tensor, " d"]
    gains: Float[torch.Tensor, " L"]
    gains_paper: Float[torch.Tensor, " L"]
    gains_std: Float[torch.Tensor, " L"]
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ properties
    @property
    def d(self) -> int:
        return self.P.shape[-1]

    @property
    def n_layers(self) -> int:
        return self.A.shape[0]

    @property
    def layers(self) -> list[int]:
        """Layers at which an injection can be placed (0..L-1)."""
        return list(range(self.n_layers))

    @property
    def h(self) -> Float[torch.Tensor, " L"]:
        """Predicted gains (alias of `gains`, the paper's h)."""
        return self.gains

    @property
    def variant(self) -> str:
        return self.meta.get("variant", DEFAULT_VARIANT)

    def predict(self, u: Float[torch.Tensor, " L"] | Sequence[float]) -> torch.Tensor:
        """Predicted readout shift for a schedule u (norm-relative units): gains @ u."""
        u = torch.as_tensor(u, dtype=torch.float64)
        if u.shape != (self.n_layers,):
            raise ShapeError(f"u: expected shape [{self.n_layers}], got {tuple(u.shape)}")
        return self.gains @ u

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        model: HookedTransformer,
        prompts: PromptsLike,
        directions: ConceptDirections,
        *,
        d: int = 32,
        basis: Basis = DEFAULT_BASIS,
        readout: str | Readout = "concept",
        variant: Variant = DEFAULT_VARIANT,
        label_words: Sequence[str] | None = None,
        batch_size: int = 16,
        seed: int = 0,
        progress: bool = False,
        distributed: bool = False,
    ) -> Surrogate:
        """Identify the surrogate from JVPs at the operating prompts' clean trajectories.

        Layer by layer: push the d columns of P_l through every prompt's A_l (vmapped JVPs on
        the frozen-context single-token path), choose P_{l+1} from those images, and reduce.

        Args:
            model: the model (its own dtype is used for the JVPs; the reduction is float64).
            prompts: the operating split (strings or token ids).
            directions: concept directions fitted on the (disjoint) concept split.
            d: reduced order.
            basis: "krylov" (reachability recursion P_{l+1} = orth[unit_{l+1}, mean A_l P_l]),
                "pod" (principal directions of the prompts' propagated injection responses),
                "random" (unit_l then random orthonormal columns: the paper's ablation).
            readout: "concept" (<unit_L, x_L>) or "logits" (logit difference of label_words).
            variant: "per-prompt" (default) or "paper" (gains of the single mean model).
            batch_size: prompts per JVP batch.
            seed: for random basis columns (and breakdown fill).
            distributed: shard prompts over an initialised torch.distributed group and
                all-reduce the statistics (see `steerlin.distributed`).
        """
        check_model(model)
        directions.check_for(model)
        if not 1 <= int(d) <= model.cfg.d_model:
            raise InputError(f"d: expected 1 <= d <= d_model={model.cfg.d_model}, got {d}")
        if basis not in BASES:
            raise InputError(f"basis: expected one of {BASES}, got {basis!r}")
        if variant not in VARIANTS:
            raise InputError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        unit = directions.unit.to(torch.float64)
        zero = (unit[1:].norm(dim=-1) == 0).nonzero().flatten()
        if len(zero):
            raise InputError(
                f"directions: zero concept direction at layers {(zero + 1).tolist()}; the "
                "surrogate needs a non-zero unit_l for l >= 1"
            )
        rd = make_readout(model, readout, directions.unit[-1], label_words=label_words)
        reduce = _identity_reduce
        if distributed:
            from .distributed import all_reduce_sum, shard_prompts

            prompts = shard_prompts(prompts)
            reduce = all_reduce_sum
        contexts = list(iter_contexts(model, prompts, batch_size=batch_size))
        stats = _fit_core(model, contexts, directions, rd, int(d), basis, seed, progress, reduce)
        n_total = int(stats.pop("n"))
        meta = model_meta(model) | {
            "d": int(d),
            "basis": basis,
            "variant": variant,
            "readout": rd.to_meta(),
            "n_prompts": n_total,
            "seed": seed,
            "scale": directions.scale.to(torch.float64).tolist(),
        }
        gains = stats["gains_prompt"] if variant == "per-prompt" else stats["gains_paper"]
        return cls(
            P=stats["P"],
            A=stats["A"],
            B=stats["B"],
            c=stats["c"],
            gains=gains,
            gains_paper=stats["gains_paper"],
            gains_std=stats["gains_std"],
            meta=meta,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """safetensors (P, A, B, c, gains) + JSON metadata."""
        save_tensors(
            path,
            "Surrogate",
            {
                "P": self.P,
                "A": self.A,
                "B": self.B,
                "c": self.c,
                "gains": self.gains,
                "gains_paper": self.gains_paper,
                "gains_std": self.gains_std,
            },
            self.meta,
        )

    @classmethod
    def load(cls, path, model: HookedTransformer | None = None) -> Surrogate:
        """Load a saved surrogate; with `model`, refuse one fitted on another model shape."""
        t, meta = load_tensors(path, "Surrogate")
        need = {"P", "A", "B", "c", "gains", "gains_paper", "gains_std"}
        if not need <= set(t):
            raise FileFormatError(
                f"{str(path)!r}: Surrogate file lacks tensors {sorted(need - set(t))}"
            )
        if model is not None:
            check_model_meta(meta, model.cfg, path)
            check_model_meta(
                {"n_layers": t["P"].shape[0] - 1, "d_model": t["P"].shape[1]}, model.cfg, path
            )
        return cls(**{k: t[k] for k in need}, meta=meta)

    def __repr__(self) -> str:
        return (
            f"Surrogate(model={self.meta.get('model_name')!r}, L={self.n_layers}, d={self.d}, "
            f"basis={self.meta.get('basis')!r}, variant={self.variant!r}, "
            f"readout={self.meta.get('readout', {}).get('kind')!r})"
        )


def _identity_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def _fit_core(
    model: HookedTransformer,
    contexts: list[FrozenContext],
    directions: ConceptDirections,
    readout: Readout,
    d: int,
    basis: str,
    seed: int,
    progress: bool,
    reduce,
) -> dict[str, torch.Tensor]:
    """Layer-major identification; `reduce` sums a statistic over processes (identity: one)."""
    L, H = model.cfg.n_layers, model.cfg.d_model
    f64 = torch.float64
    gen = torch.Generator().manual_seed(seed)
    unit = directions.unit.to(f64)
    scale = directions.scale.to(f64)
    n_local = sum(len(c) for c in contexts)
    n = int(reduce(torch.tensor(float(n_local), dtype=f64)).item())
    if n == 0:
        raise InputError("prompts: expected at least one operating prompt, got none")

    # b_l = 0 where unit_l = 0 (e.g. every prompt ends in the same token: x_0 is identical)
    scale = scale * (unit.norm(dim=-1) > 0).to(f64)
    # Only P_0[:, 0] matters (nothing perturbs x_0 before the first injection).
    anchor0 = unit[0] if unit[0].norm() > 0 else torch.eye(H, dtype=f64)[0]
    P = [krylov.random_basis(anchor0, d, generator=gen)]
    # R[i]: per-prompt reduced responses at the current layer to unit injections at 0..l-1
    R = [torch.zeros(len(c), d, 0, dtype=f64) for c in contexts]
    A_mean, B_mean = [], []
    for layer in tqdm(range(L), desc="surrogate", disable=not progress, leave=False):
        Pl = P[layer]
        Ys: list[torch.Tensor] = []
        sum_Y = torch.zeros(d, H, dtype=f64)
        for ctx in contexts:
            tang = Pl.T.to(ctx.states.dtype)[None].expand(len(ctx), d, H)
            Y = ctx.jvp(layer, tang).to(f64)  # [b, d, H]: rows are A_l(p) P_l[:, j]
            Ys.append(Y)
            sum_Y += Y.sum(0)
        gram = None
        if basis == "pod":
            # propagated responses to every injection so far plus the new one (unit_l), each
            # injection layer weighted to unit mean-square norm over all prompts
            resps = [
                torch.einsum("bdh,bdk->bkh", Y, torch.cat([R[i], _e1(len(Y), d, f64)], dim=2))
                for i, Y in enumerate(Ys)
            ]  # [b, l+1, H]
            sq = reduce(sum(r.pow(2).sum(-1).sum(0) for r in resps)) / n
            w = sq.clamp_min(1e-300).rsqrt()
            gram = torch.zeros(H, H, dtype=f64)
            for r in resps:
                rw = r * w[None, :, None]
                gram += torch.einsum("bkh,bkg->hg", rw, rw)
            del resps
        sum_Y = reduce(sum_Y)
        mean_Y = sum_Y / n  # [d, H]
        if basis == "krylov":
            nxt = krylov.anchored_orth(
                unit[layer + 1], mean_Y.T, d, generator=gen, what=f"basis P_{layer + 1}"
            )
        elif basis == "pod":
            nxt = krylov.pod_basis(unit[layer + 1], reduce(gram), d, generator=gen)
        else:
            nxt = krylov.random_basis(unit[layer + 1], d, generator=gen)
        P.append(nxt)
        A_l = nxt.T @ mean_Y.T  # [d, d] = P_{l+1}^T (mean A_l) P_l
        A_mean.append(A_l)
        B_mean.append(scale[layer] * A_l[:, 0])
        for i, Y in enumerate(Ys):
            Ab = torch.einsum("hi,bjh->bij", nxt, Y)  # [b, d, d] per-prompt Abar
            Bb = scale[layer] * Ab[:, :, 0]
            R[i] = torch.cat([Ab @ R[i], Bb[:, :, None]], dim=2)
        del Ys

    # readout rows: c(p) = P_L^T ∇y(p); concept readout gives e_1 for every prompt
    sum_c = torch.zeros(d, dtype=f64)
    sum_g = torch.zeros(L, dtype=f64)
    sum_g2 = torch.zeros(L, dtype=f64)
    for i, ctx in enumerate(contexts):
        grad = readout.gradient(model, ctx.states[:, -1]).to(f64)  # [b, H]
        c_p = grad @ P[L]  # [b, d]
        sum_c += c_p.sum(0)
        g_p = torch.einsum("bd,bdk->bk", c_p, R[i])  # [b, L]
        sum_g += g_p.sum(0)
        sum_g2 += g_p.pow(2).sum(0)
    c = reduce(sum_c) / n
    gains_prompt = reduce(sum_g) / n
    var = (reduce(sum_g2) / n - gains_prompt.pow(2)).clamp_min(0)
    A = torch.stack(A_mean)
    B = torch.stack(B_mean)
    gains_paper = krylov.gains_from_reduced(A, B, c)
    out = {
        "P": torch.stack(P),
        "A": A,
        "B": B,
        "c": c,
        "gains_prompt": gains_prompt,
        "gains_paper": gains_paper,
        "gains_std": var.sqrt(),
        "n": torch.tensor(n),
    }
    for k in ("gains_prompt", "gains_paper"):
        if not torch.isfinite(out[k]).all():
            bad = (~torch.isfinite(out[k])).nonzero().flatten().tolist()
            raise NonFiniteError(f"surrogate: non-finite gains at layers {bad}")
    return out


def _e1(b: int, d: int, dtype) -> torch.Tensor:
    e = torch.zeros(b, d, 1, dtype=dtype)
    e[:, 0, 0] = 1.0
    return e


__all__ = ["Surrogate", "BASES", "VARIANTS"]
