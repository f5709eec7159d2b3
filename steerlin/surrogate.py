"""The LLV surrogate: a low-order linear model of the last token's depth dynamics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float

from .backend import Model, check_model
from .directions import ConceptDirections
from .errors import FileFormatError, InputError, ShapeError
from .fit_checks import check_fit_args
from .fit_inputs import auto_progress, resolve_inputs
from .frozen import FrozenContext, context_nbytes, iter_contexts, layerwise_contexts
from .identify import identify, identity_reduce
from .io import (
    ANY_FLOAT_DTYPES,
    check_model_meta,
    check_number_list,
    check_tensor,
    check_unexpected,
    load_tensors,
    meta_int,
    model_meta,
    save_tensors,
)
from .metrics import Fidelity, fidelity
from .readouts import Readout, make_readout
from .validate import check_distinct_tokens, check_int

Basis = Literal["krylov", "two-sided", "observable", "pod", "random"]
Variant = Literal["per-prompt", "paper"]
BASES = ("krylov", "two-sided", "observable", "pod", "random")
VARIANTS = ("per-prompt", "paper")
DEFAULT_VARIANT: Variant = "per-prompt"
DEFAULT_BASIS: Basis = "two-sided"
#: Default order: a real reduction on an 18-30 block model (d >= L + 1 realises the mean model
#: exactly, docs/method.md).
DEFAULT_D = 8
#: bytes of full frozen contexts a two-sided fit keeps between its two passes
DEFAULT_CONTEXT_MEMORY = 256 * 2**20
#: tensors a Surrogate file may hold or not (older files, krylov/pod/random fits)
OPTIONAL = ("gains_identity", "hankel", "gains_exact", "adjoint_captured")


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

    The two-sided and observable fits also keep what their observability pass computes anyway:
    `gains_exact` Float[L], the exact gains g_l = mean_p scale_l ⟨∂y(p)/∂x_l, unit_l⟩ on the
    same prompts (what `exact_gains` returns), so every such fit carries its own reduction
    check (`reduction_error()`), and `adjoint_captured` Float[L+1], the share of the prompts'
    ‖∂y(p)/∂x_l‖² that span(P_l) holds (where it is low, no shared basis of order d carries
    the individual prompts' dynamics). Krylov/POD/random fits leave both None.
    """

    P: Float[torch.Tensor, "Lp1 H d"]
    A: Float[torch.Tensor, "L d d"]
    B: Float[torch.Tensor, "L d"]
    c: Float[torch.Tensor, " d"]
    gains: Float[torch.Tensor, " L"]
    gains_paper: Float[torch.Tensor, " L"]
    gains_std: Float[torch.Tensor, " L"]
    meta: dict[str, Any] = field(default_factory=dict)
    directions: ConceptDirections | None = field(default=None, compare=False, repr=False)
    gains_identity: Float[torch.Tensor, " L"] | None = None
    hankel: Float[torch.Tensor, "Lp1 d"] | None = None
    gains_exact: Float[torch.Tensor, " L"] | None = None
    adjoint_captured: Float[torch.Tensor, " Lp1"] | None = None

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

    def order(self, rtol: float = 1e-3) -> list[int]:
        """Per layer, how many Hankel singular values exceed `rtol` times that layer's largest:
        the number of dimensions the input-output map from injections to the readout really
        uses there (bounded by d; a count equal to d says d is too small to tell)."""
        if self.hankel is None:
            raise InputError("order: this surrogate has no Hankel singular values (an old file)")
        top = self.hankel.max(dim=-1, keepdim=True).values
        return (self.hankel > rtol * top.clamp_min(1e-300)).sum(-1).tolist()

    def reduction_error(self) -> Fidelity:
        """The reduction's self-check: `gains` against `gains_exact` (the exact gains on the
        prompts it was fitted on) in raw units, beside the identity-Jacobian and scale nulls.
        Per layer, `(sur.gains - sur.gains_exact).abs() / sur.gains_exact.abs()` says where the
        low-order model holds (on tweets not at the first blocks). The exact gains come free
        with the two-sided/observable fits: use them (`Controller.from_gains(sur.gains_exact,
        sur.directions, target)`) wherever the reduction's error matters."""
        if self.gains_exact is None:
            raise InputError(
                f"reduction_error: this surrogate has no exact gains (basis "
                f"{self.meta.get('basis')!r}; the two-sided and observable fits compute them, or "
                "compare with steerlin.exact_gains on the same prompts)"
            )
        scale = None if self.directions is None else self.directions.scale[: self.n_layers]
        if scale is None and "scale" in self.meta:
            scale = torch.tensor(self.meta["scale"][: self.n_layers], dtype=torch.float64)
        return fidelity(self.gains, self.gains_exact, scale=scale, identity=self.gains_identity)

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
        model: Model,
        prompts: Any,
        directions: Any = None,
        *,
        d: int = DEFAULT_D,
        basis: Basis = DEFAULT_BASIS,
        readout: str | Readout = "concept",
        variant: Variant = DEFAULT_VARIANT,
        label_words: Sequence[str] | Sequence[int] | None = None,
        concept_fraction: float = 0.5,
        batch_size: int = 16,
        seed: int = 0,
        progress: bool | None = None,
        distributed: bool = False,
        engine: str = "auto",
        context_memory: int = DEFAULT_CONTEXT_MEMORY,
        label_names: Sequence[str] | None = None,
    ) -> Surrogate:
        """Identify the surrogate from JVPs at the operating prompts' clean trajectories.

        Layer by layer: push the d columns of P_l through every prompt's A_l (vmapped JVPs on
        the frozen-context single-token path), choose P_{l+1} from those images, and reduce.

        What fit needs: operating prompts (where the dynamics are identified) and concept
        directions (what is injected and read). Either comes from `prompts`, or `directions`:

        - `Splits`: directions from `concept` (class means), identification on `operating`;
          `eval` is untouched (no prompt is used twice).
        - `Task`: split with `task.split(*task.default_counts(), seed=seed)` (the paper's
          400/200/200 per class, or 2:1:1 of a smaller task: the demo task's 300 per class give
          150/75/75; `meta["inputs"]` says which), then as `Splits`; the same call gives you
          the held-out `eval` split.
        - `LabelledPrompts` or a tuple `(prompts, labels)` (strings or token-id lists, 0/1
          labels): each class is split with `seed` into disjoint concept (`concept_fraction`,
          default half) and operating prompts.
        - plain prompts (strings, token-id lists or a [n, T] tensor) with `directions=`: all of
          them are operating prompts.
        - `directions=`: a `ConceptDirections`, or vectors you bring (a tensor [L+1, H] or [H],
          a dict layer -> vector, a steering-vectors `SteeringVector`, a repeng
          `ControlVector`, a `.gguf` control vector: see `ConceptDirections.from_vectors`,
          whose scales are then measured on the concept prompts if `prompts` has them, else on
          the operating prompts). Labels in `prompts` are then not needed. The concept readout
          is ⟨unit_L, x_L⟩ along the final direction.

        Args:
            model: the model (its own dtype is used for the JVPs; the reduction is float64).
            prompts: see above.
            directions: see above; `None` to fit them from the labels in `prompts`.
            d: reduced order.
            basis: "krylov" (reachability recursion P_{l+1} = orth[unit_{l+1}, mean A_l P_l]),
                "two-sided" (interleaves the leading observability directions, principal
                directions of the prompts' readout gradients propagated backwards by VJPs,
                w_l = A_lᵀ w_{l+1}, with the Krylov reachability directions),
                "observable" (observability directions only),
                "pod" (principal directions of the prompts' propagated injection responses),
                "random" (unit_l then random orthonormal columns: the paper's ablation).
                See docs/method.md for which to use and why.
            readout: "concept" (<unit_L, x_L>) or "logits" (logit difference of label_words).
            variant: "per-prompt" (default) or "paper" (gains of the single mean model).
            concept_fraction: share of each class used for directions when `prompts` is a
                `LabelledPrompts` or `(prompts, labels)` and `directions` is None.
            batch_size: prompts per JVP batch.
            seed: for the concept/operating split, random basis columns (and breakdown fill).
            progress: progress bars on stderr (capture, the layer sweep); None (default): on
                when stderr is a terminal and the fit forwards more than 48 prompts.
            distributed: shard prompts over an initialised torch.distributed group and
                all-reduce the statistics (see `steerlin.distributed`).
            engine: frozen-context engine for the JVPs/VJPs, "auto" (default: the fast
                engine where it implements the model), "fast" or "tl" (`steerlin.frozen`).
            label_names: (name of label 0, name of label 1) when the directions are fitted
                here (default: a Task's class names, else "label 0"/"label 1"): what targets
                such as "positive" and the printed sign convention call the two poles.
            context_memory: bytes of frozen contexts (every block's keys/values) the
                two-sided/observable fit may keep from its observability pass for the
                layer-major sweep (default 256 MiB: a few hundred short prompts). Batches
                beyond it are rebuilt block by block (streamed: memory O(batch), one extra
                forward each). 0 streams everything; results are the same either way.

        The fitted `Surrogate.directions` holds the directions used, for `scan_gains`,
        `exact_gains` and friends.
        """
        d = check_int("d", d)
        progress = auto_progress(progress, prompts)
        options = {k: v for k, v in locals().items() if k not in ("cls", "d")}
        return cls._fit_many(orders=[d], **options)[d]  # one signature, checked there

    @classmethod
    def fit_orders(
        cls, model: Model, prompts: Any, directions: Any = None, *, orders: Sequence[int], **kwargs
    ) -> dict[int, Surrogate]:
        """Surrogates of several orders d from ONE identification at max(orders).

        The "krylov", "two-sided" and "observable" bases are nested: P_l of order d' is the
        first d' columns of P_l of order d > d' (the candidates are taken in the same order,
        and the observability directions do not depend on the basis), so every reduced matrix
        of order d' is the top-left block of order d's, per prompt, and the result equals
        separate fits (tests check it). One fit costs what the largest order costs. For
        "random" the truncation is a random basis too, but another draw than a separate fit
        with the same seed. "pod" is not nested (its statistic depends on the basis) and is
        fitted once per order. Keyword arguments are those of `fit` (`directions=` included).
        """
        if isinstance(orders, str) or not isinstance(orders, Sequence | range | set):
            raise InputError(f"orders: expected a list of reduced orders d, got {orders!r}")
        orders = sorted({check_int("orders", o) for o in orders})
        if not orders:
            raise InputError("orders: expected at least one reduced order d")
        kwargs["progress"] = auto_progress(kwargs.get("progress"), prompts)
        if kwargs.get("basis", DEFAULT_BASIS) == "pod":
            return {o: cls.fit(model, prompts, directions, d=o, **kwargs) for o in orders}
        return cls._fit_many(model, prompts, directions, orders=orders, **kwargs)

    @classmethod
    def _fit_many(
        cls,
        model: Model,
        prompts: Any,
        directions: Any = None,
        *,
        orders: Sequence[int],
        basis: Basis = DEFAULT_BASIS,
        readout: str | Readout = "concept",
        variant: Variant = DEFAULT_VARIANT,
        label_words: Sequence[str] | None = None,
        concept_fraction: float = 0.5,
        batch_size: int = 16,
        seed: int = 0,
        progress: bool = False,
        distributed: bool = False,
        engine: str = "auto",
        context_memory: int = DEFAULT_CONTEXT_MEMORY,
        label_names: Sequence[str] | None = None,
    ) -> dict[int, Surrogate]:
        """`fit` at max(orders), one Surrogate per order (see `fit_orders`)."""
        context_memory, orders, batch_size, seed, concept_fraction = check_fit_args(
            model,
            prompts,
            orders,
            bases=BASES,
            variants=VARIANTS,
            basis=basis,
            readout=readout,
            variant=variant,
            label_words=label_words,
            concept_fraction=concept_fraction,
            batch_size=batch_size,
            seed=seed,
            distributed=distributed,
            context_memory=context_memory,
        )
        d = max(orders)
        inputs = resolve_inputs(
            prompts, labels_needed=directions is None, seed=seed, concept_fraction=concept_fraction
        )
        directions = cls._resolve_directions(model, directions, inputs, batch_size, label_names)
        prompts = inputs.operating
        rd = make_readout(model, readout, directions.unit[-1], label_words=label_words)
        check_distinct_tokens("label_words", rd.pos_token, rd.neg_token, label_words)
        reduce = identity_reduce
        if distributed:
            from .distributed import all_reduce_sum, shard_prompts

            prompts = shard_prompts(prompts)
            reduce = all_reduce_sum
        held: list[FrozenContext] = []
        stats = identify(
            model,
            directions,
            rd,
            reduce,
            d=d,
            basis=basis,
            seed=seed,
            progress=progress,
            orders=orders,
            # the contexts kept from the first pass while they fit in `context_memory` bytes
            full=lambda: _keep_within(
                iter_contexts(model, prompts, batch_size=batch_size, engine=engine),
                held,
                context_memory,
            ),
            layerwise=lambda: layerwise_contexts(
                model, prompts, batch_size=batch_size, engine=engine
            ),
            held=held,
        )
        n_total = int(stats.pop("n"))
        out = {}
        for o in orders:
            st = stats if o == d else stats["orders"][o]
            meta = model_meta(model) | {
                "d": int(o),
                "basis": basis,
                "variant": variant,
                "readout": rd.to_meta(),
                "n_prompts": n_total,
                "seed": seed,
                "scale": directions.scale.to(torch.float64).tolist(),
                "inputs": inputs.how,
                "n_concept": 0 if inputs.concept is None else len(inputs.concept),
                "directions_source": directions.meta.get("source", "class means"),
                # prompts whose full contexts the two-sided pass kept for the sweep (no second
                # forward for them; `context_memory`)
                "held_prompts": sum(len(c) for c in held),
                # target units: one class separation of this readout on the concept split
                "separation": _separation_meta(directions, rd),
                "label_names": list(directions.meta.get("label_names", ["label 0", "label 1"])),
            }
            gains = st["gains_prompt"] if variant == "per-prompt" else st["gains_paper"]
            out[o] = cls(
                P=st["P"],
                A=st["A"],
                B=st["B"],
                c=st["c"],
                gains=gains,
                gains_paper=st["gains_paper"],
                gains_std=st["gains_std"],
                meta=meta,
                directions=directions,
                gains_identity=stats["gains_identity"],
                hankel=st["hankel"],
                gains_exact=stats["gains_exact"],
                adjoint_captured=st.get("adjoint_captured"),
            )
        return out

    @staticmethod
    def _resolve_directions(model, directions, inputs, batch_size, label_names):
        """The fit's ConceptDirections: fitted on the concept split when none are given,
        wrapped from raw vectors (scaled on the concept or operating prompts), checked for
        the model and for a non-zero unit_l at every l >= 1."""
        if directions is None:
            directions = ConceptDirections.fit(
                model,
                inputs.concept,
                inputs.concept_labels,
                batch_size=batch_size,
                label_names=label_names or inputs.label_names,
            )
        elif not isinstance(directions, ConceptDirections):
            scale_prompts = inputs.concept if inputs.concept is not None else inputs.operating
            directions = ConceptDirections.from_vectors(
                model, directions, scale_prompts, batch_size=batch_size
            )
        directions.check_for(model)
        unit = directions.unit.to(torch.float64)
        zero = (unit[1:].norm(dim=-1) == 0).nonzero().flatten()
        if len(zero):
            raise InputError(
                f"directions: zero concept direction at layers {(zero + 1).tolist()}; the "
                "surrogate needs a non-zero unit_l for l >= 1"
            )
        return directions

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """safetensors (P, A, B, c, gains, and the directions if known) + JSON metadata."""
        tensors = {
            "P": self.P,
            "A": self.A,
            "B": self.B,
            "c": self.c,
            "gains": self.gains,
            "gains_paper": self.gains_paper,
            "gains_std": self.gains_std,
        }
        for name in OPTIONAL:
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        meta = dict(self.meta)
        if self.directions is not None:
            dr = self.directions
            tensors |= {"dir_vectors": dr.vectors, "dir_unit": dr.unit, "dir_scale": dr.scale}
            meta["directions_meta"] = dr.meta
        save_tensors(path, "Surrogate", tensors, meta)

    @classmethod
    def load(
        cls, path, model: Model | None = None, *, allow_other_model: bool = False
    ) -> Surrogate:
        """Load a saved surrogate; every tensor's shape, dtype and finiteness is checked against
        the metadata and the other tensors. With `model`, refuse one fitted on another model
        shape, or on another model of the same shape (weight fingerprint;
        `allow_other_model=True` to use it anyway)."""
        if model is not None:
            check_model(model)
        t, meta = load_tensors(path, "Surrogate")
        need = {"P", "A", "B", "c", "gains", "gains_paper", "gains_std"}
        if not need <= set(t):
            raise FileFormatError(
                f"{str(path)!r}: Surrogate file lacks tensors {sorted(need - set(t))}"
            )
        dir_keys = {"dir_vectors", "dir_unit", "dir_scale"}
        check_unexpected(path, "Surrogate", t, need | dir_keys | set(OPTIONAL))
        if model is not None:
            check_model_meta(meta, model, path, allow_other_model=allow_other_model)
        check_tensor(path, "P", t["P"], (None, None, None))
        L = meta_int(meta, "n_layers", path, min=1)
        H = meta_int(meta, "d_model", path, min=1)
        d = meta_int(meta, "d", path, min=1)
        L = t["P"].shape[0] - 1 if L is None else L
        H = t["P"].shape[1] if H is None else H
        d = t["P"].shape[2] if d is None else d
        shapes = {
            "P": (L + 1, H, d),
            "A": (L, d, d),
            "B": (L, d),
            "c": (d,),
            "gains": (L,),
            "gains_paper": (L,),
            "gains_std": (L,),
            "gains_identity": (L,),
            "hankel": (None, None),
            "gains_exact": (L,),
            "adjoint_captured": (L + 1,),
        }
        for name, shape in shapes.items():
            if name in t:
                check_tensor(path, name, t[name], shape)
        if "scale" in meta:
            check_number_list(path, "scale", meta["scale"], L)
        sep = meta.get("separation")
        if sep is not None:
            value = sep.get("value") if isinstance(sep, dict) else sep
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (value == value and abs(value) != float("inf"))
            ):
                raise FileFormatError(
                    f"{str(path)!r}: metadata 'separation' should hold a finite number, got {sep!r}"
                )
        if "variant" in meta and meta["variant"] not in VARIANTS:
            raise FileFormatError(
                f"{str(path)!r}: metadata 'variant' should be one of {VARIANTS}, "
                f"got {meta['variant']!r}"
            )
        rd = meta.get("readout")
        if rd is not None and not (
            isinstance(rd, dict) and rd.get("kind") in ("concept", "logits")
        ):
            raise FileFormatError(f"{str(path)!r}: metadata 'readout' is not a readout, {rd!r}")
        if model is not None:
            check_model_meta({"n_layers": L, "d_model": H}, model.cfg, path)
        dirs = None
        if dir_keys & set(t):
            if not dir_keys <= set(t):
                raise FileFormatError(
                    f"{str(path)!r}: Surrogate file has some directions tensors but lacks "
                    f"{sorted(dir_keys - set(t))}"
                )
            for name in ("dir_vectors", "dir_unit"):
                check_tensor(path, name, t[name], (L + 1, H), dtypes=ANY_FLOAT_DTYPES)
            check_tensor(path, "dir_scale", t["dir_scale"], (L + 1,), dtypes=ANY_FLOAT_DTYPES)
            dmeta = meta.pop("directions_meta", {})
            if not isinstance(dmeta, dict):
                raise FileFormatError(f"{str(path)!r}: metadata 'directions_meta' is not a dict")
            dirs = ConceptDirections(t["dir_vectors"], t["dir_unit"], t["dir_scale"], dmeta)
        extra = {k: t[k] for k in OPTIONAL if k in t}
        return cls(**{k: t[k] for k in need}, meta=meta, directions=dirs, **extra)

    @property
    def brought_directions(self) -> bool:
        """True when the directions were brought (`directions=` vectors), not class means."""
        return self.meta.get("directions_source", "class means") not in (
            "class means",
            "ConceptDirections",
        )

    @property
    def target_unit(self) -> str:
        """What one target unit (one "class separation") is here, in raw readout units."""
        sep = (self.meta.get("separation") or {}).get("value")
        if sep is None:
            return "no class separation stored: targets only in raw readout units (units='raw')"
        if not self.brought_directions:
            return (
                f"1 class separation = {sep:.4g} raw readout units (label-1 mean minus label-0 "
                "mean of the readout on the concept split)"
            )
        src = self.meta.get("directions_source")
        return (
            f"1 'class separation' = {sep:.4g} raw readout units: the brought vector's own "
            f"size at x_L, ⟨unit_L, v_L⟩ = ‖v_L‖ ({src} vectors carry no class means; a "
            "unit-norm vector such as repeng's makes it 1 raw unit). Targets in raw units: "
            "units='raw'"
        )

    def summary(self) -> str:
        """A few lines: what was fitted on what, what one target unit is, where the gains are."""
        g = self.gains.to(torch.float64)
        top = torch.argsort(g.abs(), descending=True)[:3].tolist()
        rd = self.meta.get("readout", {}).get("kind", "concept")
        lines = [
            repr(self),
            f"inputs: {self.meta.get('inputs', '?')}; {self.meta.get('n_prompts', '?')} "
            f"operating prompts, {self.meta.get('n_concept', 0)} concept prompts",
            f"directions: {self.meta.get('directions_source', 'class means')}; readout: {rd}",
            f"target unit: {self.target_unit}",
            "gains dy/du_l (u norm-relative: 0.1 = 10% of ‖x_l‖), largest at layers "
            + ", ".join(f"{l} ({float(g[l]):+.4g})" for l in top),
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Surrogate(model={self.meta.get('model_name')!r}, L={self.n_layers}, d={self.d}, "
            f"basis={self.meta.get('basis')!r}, variant={self.variant!r}, "
            f"readout={self.meta.get('readout', {}).get('kind')!r})"
        )


def _separation_meta(directions: ConceptDirections, rd: Readout) -> dict | None:
    """{"value", "readout", "split"}: the readout's class-mean difference (label 1 − label 0)
    on the directions' (concept) split, or None if the directions cannot give it."""
    fn = getattr(directions, "separation", None)
    value = fn(rd) if fn is not None else None
    if value is None:
        return None
    return {"value": value, "readout": rd.kind, "split": "concept", "plus": "label 1"}


def _keep_within(batches, held: list, budget: int):
    """Yield the contexts; append them to `held` while their total size stays within
    `budget` bytes (the first batch that does not fit ends the keeping)."""
    used, keeping = 0, True
    for ctx in batches:
        if keeping:
            used += context_nbytes(ctx)
            keeping = used <= budget
            if keeping:
                held.append(ctx)
        yield ctx


__all__ = ["Surrogate", "BASES", "VARIANTS"]
