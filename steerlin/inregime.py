"""In-regime gains: how much a readout moves per unit injection, in the regime the hooks run in.

A schedule's injection α·b_l at layer l (b_l = scale_l unit_l) is added at the last prompt token
and at every generated token ("generated", what `apply` does under `model.generate`), and the
steered keys/values of earlier positions feed later ones (attention not frozen). Along the
prompts' unsteered greedy continuations, teacher-forced, each readout y at measured position i
moves by δy_i ≈ α g_il to first order; `regime_gains` computes every g_il from the same
forward-mode JVPs as `steerlin.budget.regime_fisher` (one tangent per injection layer, folded
into the batch) and, from the same logit tangents R_il = ∂z_i/∂α_l, the Fisher F_i of the
injection, so one pass gives the readouts' gains and the KL metric:

- "concept": y = unit_Lᵀ x_L, the concept projection of the final residual
  (g = unit_Lᵀ ∂x_L/∂α_l);
- "label_words": y = mean_{w ∈ +} z_w − mean_{w ∈ −} z_w, the label words' logit difference;
- "lexicon": y = E_π[s] = Σ_v π_v s_v, the expected token score under the next-token
  distribution (`steerlin.lexicon`), g = Σ_v s_v π_v (R_v − Σ_w π_w R_w).

`RegimeGains.gains[name]` is g averaged over the measured positions and prompts, and
`RegimeGains.per_kl(name)` = |g_l| / sqrt(mean_i F_i[l, l]): the readout change of layer l alone
at a matched mean KL (its matched amplitude is sqrt(2·KL / F_ll)), per sqrt(2·KL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float

from .backend import check_model
from .budget import (
    RegimeFisher,
    _fisher_chunk,
    _logit_jvps,
    _tangent_batches,
    continuations,
)
from .errors import InputError, NonFiniteError, ShapeError
from .lexicon import Lexicon, get_lexicon
from .regime import Continuations, check_policy
from .validate import check_int

F64 = torch.float64
READOUTS = ("concept", "label_words", "lexicon")


@dataclass(frozen=True)
class RegimeGains:
    """First-order readout changes per unit injection b_l, in the regime of use.

    Attributes:
        gains: {readout: Float[L]} the mean over measured positions and prompts of g_il.
        per_token: {readout: Float[N, L]} g_il per measured position (prompt-major,
            N = prompts · n_new), the rows `fisher.F` is indexed by.
        values: {readout: Float[N]} the unsteered readout at each measured position.
        fisher: the `RegimeFisher` of the same injections on the same positions (what
            `regime_fisher` returns; pass it to `size_to_kl(..., fisher=)`).
        meta: the label tokens, the lexicons' names and sizes, the regime.

    Readout names: "concept", "label_words", "lexicon" (the first lexicon) and, for every
    lexicon passed, "lexicon:<its name>".
    """

    gains: dict[str, torch.Tensor]
    per_token: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    fisher: RegimeFisher
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.gains)

    def fisher_diag(self) -> Float[torch.Tensor, " L"]:
        """mean_i F_i[l, l]: the mean-KL metric of each layer's unit injection alone."""
        return self.fisher.F.diagonal(dim1=1, dim2=2).mean(0)

    def per_kl(self, name: str) -> Float[torch.Tensor, " L"]:
        """|g_l| / sqrt(mean_i F_i[l, l]): layer l's readout change at a matched mean KL, per
        sqrt(2·KL) (0 where the injection is zero)."""
        g = self._get(name).abs()
        f = self.fisher_diag()
        return torch.where(f > 0, g / f.clamp_min(torch.finfo(F64).tiny).sqrt(), 0.0)

    def at_kl(self, name: str, kl: float) -> Float[torch.Tensor, " L"]:
        """|g_l| · sqrt(2·kl / F_ll): the first-order readout change of layer l alone sized to
        a mean KL of `kl` nats/token."""
        from .budget import check_budget

        return self.per_kl(name) * (2 * check_budget("kl", kl)) ** 0.5

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.gains:
            raise InputError(f"name: expected one of {self.names}, got {name!r}")
        return self.gains[name]


def _word_ids(model, words, side: str) -> list[int]:
    """Single-token ids of one side's label words (str or int, or a sequence of them)."""
    if isinstance(words, str) or hasattr(words, "__index__"):
        words = [words]
    try:
        words = list(words)
    except TypeError:
        raise InputError(
            f"label_words: the {side} words must be a word or a list of words"
        ) from None
    ids, V = [], model.cfg.d_vocab
    for w in words:
        if hasattr(w, "__index__") and not isinstance(w, bool | str):
            i = int(w.__index__())
            if not 0 <= i < V:
                raise InputError(f"label_words: token id {i} outside 0..{V - 1}")
            ids.append(i)
        elif isinstance(w, str):
            if model.tokenizer is None:
                raise InputError("label_words: the model has no tokenizer; pass token ids")
            toks = model.to_tokens(w, prepend_bos=False)[0].tolist()
            if len(toks) == 1 and toks[0] != getattr(model.tokenizer, "unk_token_id", None):
                ids.append(int(toks[0]))
        else:
            raise InputError(f"label_words: expected words or token ids, got {w!r}")
    if not ids:
        raise InputError(
            f"label_words: none of the {side} words {words!r} is a single token of this "
            "model's vocabulary"
        )
    return sorted(set(ids))


def label_ids(model, label_words) -> tuple[list[int], list[int]]:
    """(positive ids, negative ids) from label_words = (positive, negative), each side a word,
    a token id or a list of them; words that are not one token (or only the unknown token) are
    left out (a side with none raises InputError)."""
    if label_words is None or isinstance(label_words, str):
        raise InputError(f"label_words: expected (positive, negative), got {label_words!r}")
    try:
        pair = list(label_words)
    except TypeError:
        raise InputError(
            f"label_words: expected (positive, negative), got {label_words!r}"
        ) from None
    if len(pair) != 2:
        raise InputError(f"label_words: expected (positive, negative), got {label_words!r}")
    pos, neg = _word_ids(model, pair[0], "positive"), _word_ids(model, pair[1], "negative")
    if set(pos) == set(neg):
        raise InputError(f"label_words: {label_words!r} map to the same tokens")
    return pos, neg


def _lexicons(model, lexicon) -> list[Lexicon]:
    if lexicon is None:
        raise InputError(
            "lexicon: the lexicon readout needs a lexicon (a Lexicon, a dict or a name)"
        )
    many = isinstance(lexicon, list | tuple)
    items = list(lexicon) if many else [lexicon]
    if not items:
        raise InputError("lexicon: expected at least one lexicon, got an empty list")
    out = [
        get_lexicon(model, x, arg=f"lexicon[{i}]" if many else "lexicon")
        for i, x in enumerate(items)
    ]
    names = [x.name for x in out]
    if len(set(names)) != len(names):
        raise InputError(f"lexicon: lexicons need distinct names, got {names}")
    return out


def _injections(model, directions, concept):
    """(b [L, H] float64, the concept unit [H] float64 or None)."""
    L, H = model.cfg.n_layers, model.cfg.d_model
    if hasattr(directions, "unit") and hasattr(directions, "scale"):  # ConceptDirections
        if tuple(directions.unit.shape) != (L + 1, H):
            raise ShapeError(
                f"directions: expected [{L + 1}, {H}] units for this model, got "
                f"{tuple(directions.unit.shape)}"
            )
        b = directions.unit[:L].to("cpu", F64) * directions.scale[:L].to("cpu", F64)[:, None]
        u = directions.unit[L] if concept is None else concept
    elif isinstance(directions, torch.Tensor):
        if tuple(directions.shape) != (L, H):
            raise ShapeError(
                f"directions: expected b of shape [{L}, {H}], got {tuple(directions.shape)}"
            )
        b, u = directions.detach().to("cpu", F64), concept
    else:
        raise InputError(
            "directions: expected ConceptDirections or a [L, H] tensor, got "
            f"{type(directions).__name__}"
        )
    if not torch.isfinite(b).all():
        raise InputError("directions: non-finite injection vectors")
    if u is not None:
        u = torch.as_tensor(u).detach().to("cpu", F64)
        if tuple(u.shape) != (H,):
            raise ShapeError(f"concept: expected a direction of shape [{H}], got {tuple(u.shape)}")
    return b, u


def regime_gains(
    model,
    prompts,
    directions,
    *,
    readouts: Sequence[str] = READOUTS,
    label_words=(" positive", " negative"),
    lexicon=None,
    concept: torch.Tensor | None = None,
    positions: str = "generated",
    n_tokens: int = 8,
    batch_size: int = 2,
) -> RegimeGains:
    """In-regime gains of `readouts` for unit injections b_l (module docstring).

    Args:
        prompts: text prompts (their unsteered greedy continuations of `n_tokens` are generated
            once) or `Continuations`.
        directions: `ConceptDirections` (b_l = scale_l unit_l, concept readout along unit_L) or
            a [L, H] tensor of injection vectors b (then `concept` [H] for "concept").
        readouts: any of "concept", "label_words", "lexicon".
        label_words: (positive, negative) for "label_words": each a word, a token id or a list
            of them (mean logit of each side; words that are not one token are left out).
        lexicon: for "lexicon": a `Lexicon`, a word → score dict, a name ("vader", "afinn",
            "textblob"), or a list of them (each gets its own "lexicon:<name>" entry).
        concept: the concept readout's direction at x_L, overriding directions.unit[L].
        positions: the steering policy ("generated": last prompt token and every generated one).
        n_tokens: measured positions per prompt (continuation tokens).
        batch_size: prompts per forward (each forward carries L·batch_size rows).
    """
    check_model(model)
    if isinstance(readouts, str):
        readouts = (readouts,)
    readouts = tuple(readouts)
    bad = [r for r in readouts if r not in READOUTS]
    if not readouts or bad or len(set(readouts)) != len(readouts):
        raise InputError(f"readouts: expected distinct names from {READOUTS}, got {readouts!r}")
    positions = check_policy(positions)
    batch_size = check_int("batch_size", batch_size, min=1)
    n_tokens = check_int("n_tokens", n_tokens, min=1)
    b, u = _injections(model, directions, concept)
    if "concept" in readouts and u is None:
        raise InputError("concept: the concept readout needs a direction at x_L (concept=)")
    pos = neg = None
    if "label_words" in readouts:
        pos, neg = label_ids(model, label_words)
    lexs = _lexicons(model, lexicon) if "lexicon" in readouts else []
    if isinstance(prompts, Continuations) and len(prompts) == 0:
        raise InputError("prompts: expected at least one prompt, got none")
    cont = continuations(model, prompts, n_tokens)
    n_new = min(n_tokens, cont.n_new)
    n_meas = 1 if positions == "last" else n_new
    dev = model.cfg.device
    bm = b.to(dev, model.cfg.dtype)
    uu = None if u is None else u.to(dev)
    scores = [lx.scores.to(dev) for lx in lexs]
    keys = [r for r in readouts if r != "lexicon"] + [f"lexicon:{lx.name}" for lx in lexs]
    per = {k: [] for k in keys}
    val = {k: [] for k in keys}
    Fs, xs = [], []
    L, H = b.shape
    for xb, x, t in _tangent_batches(model, cont, bm, positions, n_new, n_meas, batch_size):
        xs.append(xb)  # x [B*n, H], t [B*n, L, H]
        if uu is not None and "concept" in keys:
            per["concept"].append((t.to(F64) @ uu).cpu())
            val["concept"].append((x.to(F64) @ uu).cpu())
        F = torch.zeros(t.shape[0], L, L, dtype=F64)  # as budget._fisher_tokens
        for s, z, pi, R in _logit_jvps(model, x, t):
            c = pi.shape[0]
            F[s : s + c] = _fisher_chunk(pi, R).cpu()
            if pos is not None:
                per["label_words"].append((R[:, :, pos].mean(-1) - R[:, :, neg].mean(-1)).cpu())
                val["label_words"].append((z[:, pos].mean(-1) - z[:, neg].mean(-1)).cpu())
            if scores:
                m = torch.einsum("clv,cv->cl", R, pi)
                for lx, sc in zip(lexs, scores, strict=True):
                    ps = pi * sc  # [c, V]
                    e = ps.sum(-1)
                    g = torch.einsum("clv,cv->cl", R, ps) - e[:, None] * m
                    per[f"lexicon:{lx.name}"].append(g.cpu())
                    val[f"lexicon:{lx.name}"].append(e.cpu())
        Fs.append(0.5 * (F + F.transpose(1, 2)))
    F = torch.cat(Fs)
    if not torch.isfinite(F).all():
        raise NonFiniteError("regime_gains: non-finite Fisher (the model's logits overflow?)")
    fisher = RegimeFisher(F, b, positions, n_meas, len(cont), torch.cat(xs))
    per_token = {k: torch.cat(v) for k, v in per.items()}
    values = {k: torch.cat(v) for k, v in val.items()}
    if lexs:  # "lexicon": the first lexicon, as well as under its own name
        first = f"lexicon:{lexs[0].name}"
        per_token = {"lexicon": per_token[first]} | per_token
        values = {"lexicon": values[first]} | values
    order = [k for k in readouts if k != "lexicon"] + (["lexicon"] if lexs else [])
    order += [f"lexicon:{lx.name}" for lx in lexs]
    per_token = {k: per_token[k] for k in order}
    values = {k: values[k] for k in order}
    meta = {
        "positions": positions,
        "n_new": n_meas,
        "n_prompts": len(cont),
        "label_tokens": None if pos is None else {"positive": pos, "negative": neg},
        "lexicons": [{"name": lx.name, "matched": lx.matched, "words": lx.words} for lx in lexs],
    }
    gains = {k: v.mean(0) for k, v in per_token.items()}
    return RegimeGains(gains, per_token, values, fisher, meta)


__all__ = ["READOUTS", "RegimeGains", "regime_gains", "label_ids"]
