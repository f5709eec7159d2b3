"""Minimum-energy steering schedules from surrogate gains (no model needed here).

With predicted shifts δy ≈ h^T u (u in norm-relative units, one amplitude per layer), the
least-norm schedule that reaches a target Δy is

    u* = Δy · h / ‖h‖²      (over the allowed layers; zero elsewhere)

and with k concepts and the gain tensor G[i, j, l] = ∂y_i/∂u_{j,l} (cross-gains included),
u* = pinv(G) t over the stacked amplitudes. Baselines spread equal amplitude over a layer
pattern (all layers, the last, one given or one random layer) and solve for its size.

`Schedule` (steerlin.schedule) is what it returns. This module imports no TransformerLens.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from jaxtyping import Float

from .energy import least_norm, make_metric
from .errors import InputError, LayerError, ShapeError, SteerlinError
from .gain_model import GainModel
from .linalg import gains_from_reduced
from .schedule import Schedule
from .targets import resolve_target
from .validate import check_int, check_layers, check_number, check_surrogate, check_targets

F64 = torch.float64


class Controller:
    """Least-norm steering schedules from one or several fitted surrogates.

    `Controller(surrogate, target=1.0)`: one concept, moved by one class separation toward
    label 1 (see below). `Controller([s1, s2], target=[t1, t2])`: several concepts on the same
    model, solved jointly with cross-gains (concept j's injection moving concept i's readout)
    taken from the surrogates, or from `coupling` (Float[k, k, L], e.g. measured with
    `steerlin.cross_gains`).

    Targets (`steerlin.targets`): a number is in class separations by default. One class
    separation is the difference of the readout's class means on the concept split (label 1
    minus label 0), stored in the surrogate at fit time; +1 moves a prompt from the mean of
    class 0 to the mean of class 1 along the readout, and + is always label 1. The strings
    "positive"/"negative" (or the concept's label names, e.g. "hateful") mean ±1. Raw readout
    (projection) units: `units="raw"`.

    Metric (`steerlin.energy`): the schedule is least-norm in `metric`: "norm" (Σu², the
    paper's, norm-relative; default), "raw" (Σ‖u_l scale_l unit_l‖²), a per-layer weight
    vector, or "kl" (½uᵀFu, the predicted KL of the next-token distribution; needs
    `model=` and `metric_prompts=`, or pass `metric=steerlin.kl_metric(model, prompts, sur)`).

    Calibration: `ctrl.calibrate(model, prompts, positions=...)` calibrates this Controller in
    place and returns it (scikit-learn's `fit` habit, so a discarded result cannot leave `apply`
    steering with the uncalibrated schedule); `apply` then uses the calibrated schedule, under
    the position policy it was calibrated in. `copy.copy(ctrl).calibrate(...)` keeps the
    original uncalibrated.

    Without a surrogate: `Controller.from_gains(h, directions, target)` takes measured gains,
    e.g. `steerlin.exact_gains` (one backward pass), since least-norm needs only h.

    KL budget (`steerlin.budget`): `Controller(sur, kl=0.1)` keeps the schedule's direction
    (the target's sign) and sizes its amplitude in `calibrate` so that the predicted mean
    per-token KL (nats) along the calibration prompts' continuations, in the regime of use,
    equals `kl`: from the first-order Fisher of the injection (JVPs of full teacher-forced
    forwards), no bisection; `kl_stat="p95"` budgets the 95th percentile instead.

    Args:
        surrogates: a Surrogate or a list of them (same model).
        target: per concept, class separations (or a label name), or raw units with
            units="raw".
        units: "separations" (default) or "raw".
        layers: the layers the schedule may use (default all).
        coupling: optional gain tensor G[i, j, l]; default from the surrogates.
        metric: "norm", "raw", "kl", Float[L] weights, Float[L, L] or a `Metric`.
        model, metric_prompts: for metric="kl" (default prompts: none; give neutral text or
            the operating prompts).
        seed: for the "random" baseline.
        kl: a KL budget (positive, nats per token) instead of a readout shift, or None.
        kl_stat: "mean" (default) or "p95" of the per-token KL along the rollouts.
    """

    def __init__(
        self,
        surrogates,
        target=1.0,
        *,
        units: str = "separations",
        layers=None,
        coupling=None,
        metric="norm",
        model=None,
        metric_prompts=None,
        seed: int = 0,
        kl=None,
        kl_stat: str = "mean",
    ):
        from .budget import check_budget, check_stat

        single = not isinstance(surrogates, list | tuple)
        self.surrogates = [surrogates] if single else list(surrogates)
        if not self.surrogates:
            raise InputError("surrogates: expected at least one Surrogate, got an empty list")
        for i, s in enumerate(self.surrogates):
            check_surrogate("surrogates" if single else f"surrogates[{i}]", s)
        seed = check_int("seed", seed)
        self.kl = None if kl is None else check_budget("kl", kl)
        self.kl_stat = check_stat("kl_stat", kl_stat)
        if self.kl is not None and not single:
            raise InputError("kl: a KL budget sizes one concept at a time")
        self.single = single
        k = len(self.surrogates)
        L = self.surrogates[0].n_layers
        H = self.surrogates[0].P.shape[1]
        for s in self.surrogates:
            if s.n_layers != L or s.P.shape[1] != H:
                raise ShapeError("surrogates: all must come from the same model shape (L, H)")
        raw_targets = check_targets("target", target, k)
        self.targets = [
            resolve_target(t, s.meta, units=units)
            for t, s in zip(raw_targets, self.surrogates, strict=True)
        ]
        self.units = units
        self.target = torch.tensor([t.raw for t in self.targets], dtype=F64)
        self.n_layers = L
        allowed = list(range(L)) if layers is None else check_layers("layers", layers, L)
        self.layers = allowed
        self.seed = seed
        try:
            self.G = self._gain_tensor(coupling)
        except (TypeError, ValueError, RuntimeError) as exc:
            if isinstance(exc, SteerlinError):
                raise
            raise InputError(
                f"coupling: expected a gain tensor [k, k, L] of numbers, got "
                f"{type(coupling).__name__} ({exc})"
            ) from None
        if isinstance(metric, str) and metric == "kl":
            if model is None or metric_prompts is None:
                raise InputError(
                    'metric="kl": pass model= and metric_prompts= (neutral text or the '
                    "operating prompts), or metric=steerlin.kl_metric(model, prompts, surrogate)"
                )
            from .fisher import kl_metric

            metric = kl_metric(model, metric_prompts, self.surrogates[0])
        try:
            self.metric = make_metric(metric, _scale_of(self.surrogates[0]))
        except (TypeError, ValueError, RuntimeError) as exc:
            if isinstance(exc, SteerlinError):
                raise
            raise InputError(
                "metric: expected 'norm', 'raw', 'kl', per-layer weights [L], a matrix [L, L] "
                f"or a Metric, got {type(metric).__name__} ({exc})"
            ) from None
        if k > 1 and self.metric.name == "kl":
            raise InputError("metric='kl' is supported for one concept at a time")
        self.calibration = None
        self._apply_positions = None
        #: the objective an alternative constructor set (`in_regime`), recorded in the meta
        self.objective = None
        #: what `recommend` based its choice on (None for a Controller built directly)
        self.recommendation = None

    @property
    def sign_convention(self) -> str:
        """Which label is + for each concept, and the size of one class separation."""
        parts = []
        for t, s in zip(self.targets, self.surrogates, strict=True):
            sep = "unknown" if t.separation is None else f"{t.separation:.4g}"
            if t.separation is not None and getattr(s, "brought_directions", False):
                sep += " raw (the brought vector's ‖v_L‖, not a class-mean difference)"
            parts.append(f"+ = {t.label_plus!r}, − = {t.label_minus!r}, 1 separation = {sep}")
        return "; ".join(parts)

    # ----------------------------------------------------------------- gains
    def _gain_tensor(self, coupling) -> torch.Tensor:
        k, L = len(self.surrogates), self.n_layers
        if coupling is not None:
            G = torch.as_tensor(coupling, dtype=F64)
            if G.shape != (k, k, L):
                raise ShapeError(f"coupling: expected shape [{k}, {k}, {L}], got {tuple(G.shape)}")
            return G
        G = torch.zeros(k, k, L, dtype=F64)
        for i, si in enumerate(self.surrogates):
            for j, sj in enumerate(self.surrogates):
                G[i, j] = si.gains if i == j else surrogate_cross_gains(si, sj)
        return G

    @property
    def coupling(self) -> Float[torch.Tensor, "k k"]:
        """‖G[i, j, :]‖ relative to ‖G[i, i, :]‖: how much concept j's injections move readout i."""
        norms = self.G.norm(dim=-1)
        return norms / norms.diagonal()[:, None]

    def _mask(self) -> torch.Tensor:
        m = torch.zeros(self.n_layers, dtype=F64)
        m[self.layers] = 1
        return m

    def _make(self, u: torch.Tensor, strategy: str) -> Schedule:
        """Schedule from stacked amplitudes u [k, L]."""
        shift = torch.einsum("ijl,jl->i", self.G, u)
        units = torch.stack([s.P[:-1, :, 0] for s in self.surrogates])  # [k, L, H]
        scales = torch.stack([_scale_of(s) for s in self.surrogates])  # [k, L]
        meta = dict(self.surrogates[0].meta)
        keep = ("model_name", "n_layers", "d_model", "model_fingerprint")
        meta = {key: meta[key] for key in keep if key in meta}
        readouts = [s.meta.get("readout", {"kind": "concept"}) for s in self.surrogates]
        rd = None
        if all(r.get("kind") == "concept" for r in readouts):
            rd = torch.stack([s.P[-1, :, 0] for s in self.surrogates])
            rd = rd[0] if self.single else rd
        meta.update(
            readout=readouts[0] if self.single else readouts,
            strategy=strategy,
            target=self.target.tolist() if not self.single else float(self.target[0]),
            predicted_shift=shift.tolist() if not self.single else float(shift[0]),
            allowed_layers=self.layers,
            metric=self.metric.to_meta(),
            target_units=[t.to_meta() for t in self.targets]
            if not self.single
            else self.targets[0].to_meta(),
        )
        if self.objective is not None:
            meta.update(objective=self.objective, strategy=self.objective["name"])
        if self.single:
            return Schedule(u[0], units[0], scales[0], meta, rd)
        return Schedule(u, units, scales, meta, rd)

    # ----------------------------------------------------------------- schedules
    def apply(self, model, *, positions="last", lengths=None):
        """Context manager: the schedule as live hooks (`Schedule.apply`).

        After `calibrate`, the calibrated schedule (a `positions` other than the one it was
        calibrated for is refused: a different regime; recalibrate). Before, the
        surrogate-sized `schedule`.
        """
        cal = self.calibration
        if cal is None:
            return self.schedule.apply(model, positions=positions, lengths=lengths)
        if _regime_of(positions) != _regime_of(self._apply_positions):
            raise InputError(
                f"positions: this Controller was calibrated with positions="
                f"{self._apply_positions!r}; applying it with {positions!r} is a different "
                f"regime (recalibrate with calibrate(..., positions={positions!r}))"
            )
        return cal.schedule.apply(model, positions=positions, lengths=lengths)

    def calibrate(
        self,
        model,
        prompts,
        *,
        positions="generated",
        n_tokens: int = 8,
        schedule: Schedule | None = None,
        readout=None,
        tol: float | None = None,
        batch_size: int = 16,
        correct: bool = False,
        fisher=None,
    ) -> Controller:
        """Calibrate this Controller on the full model in the regime of use.

        One multiplier of the schedule (default: the least-norm `schedule`; or a `baseline`)
        is bisected until the mean readout shift measured on `prompts` equals the target, in
        the regime `apply(model)` steers generation in (`steerlin.regime`), named as everywhere
        in steerlin: "generated" (default: the last prompt token and every generated token,
        which is what `apply(model)` does under `model.generate` with its KV cache) measures
        the shift over the prompts' unsteered greedy continuations of `n_tokens` tokens,
        teacher-forced, with the schedule on the last prompt token and every continuation
        token; `n_tokens=0` measures a single forward at the last prompt token only (what
        positions="last" means in `steerlin.calibrate`); "all" steers every position ("last"
        here: "generated" for one release, with a DeprecationWarning). The one calibration,
        `steerlin.measure.calibrate` (tol None: its default `TOL`). With a KL budget (`kl=`),
        `steerlin.budget.size_to_kl` instead: the multiplier from the Fisher of the injection
        on `prompts`, no bisection (`correct`: one measured steered run and one rescale;
        `fisher`: a `RegimeFisher` already computed on these prompts); `calibration` is then
        a `KLCalibration` (predicted and measured KL side by side).
        Calibrates in place (`calibration` holds the `Calibration` and `apply` uses it) and
        returns self, so `ctrl = ctrl.calibrate(...)` and a bare `ctrl.calibrate(...)` agree.
        """
        from .measure import TOL, calibrate

        if not self.single:
            raise InputError("calibrate: one concept at a time (a single multiplier per readout)")
        n_tokens = check_int("n_tokens", n_tokens, min=0)
        if isinstance(positions, str) and positions == "last" and int(n_tokens) > 0:
            warnings.warn(
                "Controller.calibrate(positions='last') measures the generation regime, which "
                "steerlin names positions='generated' (the default; steerlin.calibrate's 'last' "
                "is one last-token forward, here n_tokens=0); pass 'generated'. In the next "
                "release 'last' will mean the last-token forward here too",
                DeprecationWarning,
                stacklevel=2,
            )
        regime = _regime_of(positions)
        if regime == "generated" and int(n_tokens) == 0:
            regime = "last"
        if self.kl is not None:
            from .budget import size_to_kl

            self.calibration = size_to_kl(
                model,
                prompts,
                self.schedule if schedule is None else schedule,
                self.kl,
                stat=self.kl_stat,
                positions=regime,
                n_tokens=max(int(n_tokens), 1),
                correct=correct,
                fisher=fisher,
            )
            self._apply_positions = positions
            return self
        cal = calibrate(
            model,
            prompts,
            self.schedule if schedule is None else schedule,
            float(self.target[0]),
            units="raw",
            readout=readout,
            positions=regime,
            n_tokens=max(int(n_tokens), 1),
            tol=TOL if tol is None else tol,
            batch_size=batch_size,
        )
        self.calibration = cal
        self._apply_positions = positions
        return self

    @classmethod
    def from_gains(
        cls,
        gains,
        directions,
        target=1.0,
        *,
        model=None,
        prompts=None,
        readout="concept",
        **kwargs,
    ) -> Controller:
        """A Controller from measured per-layer gains instead of a fitted surrogate.

        The least-norm schedule u* = Δy · W⁻¹h / (hᵀW⁻¹h) needs only the gains h_l = ∂y/∂u_l,
        so exact full-model gains (`steerlin.exact_gains`: one backward pass per batch) give a
        schedule with no reduced model at all. What the surrogate adds over this is the
        reduced dynamics (A, B, c): cross-gains between concepts, Hankel spectra and a model
        of the depth dynamics, and a fit whose cost does not grow with the readouts asked of it.

        gains: Float[L] (readout change per unit norm-relative injection u_l b_l, as
            `exact_gains` and `Surrogate.gains` give them), or "exact" to measure them here
            with `exact_gains(model, prompts, directions, readout=readout)`.
        directions: the `ConceptDirections` the gains were measured along (its b_l = scale_l
            unit_l is what the schedule injects; its concept split defines one separation).
        readout: "concept" (default) or a `steerlin.readouts.Readout` (needs the directions'
            stored logit means for separations; else pass units="raw").
        kwargs: as `Controller` (units, layers, metric, model/metric_prompts for "kl", seed).
        """
        if isinstance(gains, str):
            if gains != "exact":
                raise InputError(
                    f"gains: expected a tensor of per-layer gains or 'exact', got {gains!r}"
                )
            if model is None or prompts is None:
                raise InputError('gains="exact": pass model= and prompts= to measure them on')
            from .gains import exact_gains

            gains = exact_gains(model, prompts, directions, readout=readout)
        if model is not None and "model" not in kwargs and kwargs.get("metric") == "kl":
            kwargs["model"] = model
        return cls(GainModel.build(gains, directions, readout), target, **kwargs)

    @classmethod
    def in_regime(cls, directions, gains, *, model, prompts, **kwargs) -> Controller:
        """The schedule that moves an in-regime readout most at a KL budget, calibrated.

        α ∝ (F̄ + λI)⁻¹g on the allowed layers: max gᵀα at ½αᵀF̄α fixed (g: the readout's
        in-regime gains, F̄: the mean regime Fisher of the same injections), then sized by
        `size_to_kl` from that Fisher, no second JVP pass (`steerlin.objective`). directions:
        the `ConceptDirections` (or Surrogate) the gains are along; gains: a `RegimeGains`
        (`steerlin.inregime`) or g [L] with fisher=; model, prompts: those the Fisher was
        computed on. Keywords: readout="lexicon", kl=0.1, kl_stat="mean" | "p95", layers,
        single_layer (the layer with the largest |g_l|/√F̄_ll), sign (+1 raises the readout),
        ridge (`objective.RIDGE`), fisher. meta["objective"] records what was used.
        """
        from .objective import in_regime

        return in_regime(cls, directions, gains, model=model, prompts=prompts, **kwargs)

    @classmethod
    def recommend(
        cls,
        surrogate,
        *,
        separations: float | None = None,
        sign: int = 1,
        model=None,
        prompts=None,
        n_tokens: int = 8,
        strength: float | None = None,
        kl=None,
        gains=None,
        lexicon=None,
        label_words=None,
    ) -> Controller:
        """The Controller steerlin recommends for this model and concept, computed from it.

        With a KL budget (`kl`, nats per token; "evidence": the budget the evidence used):
        the first objective in the evidence's ranking (`objective.EVIDENCE`, `choose`: min-norm
        unless one moved held-out text more on the same stems) the inputs support (in-regime:
        `gains`, a `RegimeGains` on `prompts`, or a `lexicon`/`label_words`), sized on `model`.
        Without: the least-norm schedule over all layers (u_l ∝ h_l; `recommendation["layers"]`
        hold 90% of Σu²) at `sign` x `separations` class separations (default 2; `strength=`,
        its old name, for one release), calibrated on `model` over `prompts` when given, with
        single layers ranked by h_l²/F_ll (`best_single_layer`, `layer_ranking`,
        `gain_per_kl`). `ctrl.recommendation["based_on"]` says what each choice rests on.
        """
        if kl is not None:
            from .objective import recommend_kl

            if separations is not None or strength is not None:
                raise InputError("kl: pass a KL budget or separations=, not both")
            kw = dict(gains=gains, lexicon=lexicon, label_words=label_words, n_tokens=n_tokens)
            return recommend_kl(
                cls, surrogate, sign=sign, model=model, prompts=prompts, kl=kl, **kw
            )
        if strength is not None:
            if separations is not None:
                raise InputError("separations: pass separations= only (strength= is its old name)")
            warnings.warn(
                "Controller.recommend(strength=) is now separations= (class separations); "
                "strength= goes in the next release",
                DeprecationWarning,
                stacklevel=2,
            )
            separations, name = strength, "strength"
        else:
            separations, name = (2.0 if separations is None else separations), "separations"
        strength = check_number(name, separations, positive=True)
        if sign not in (1, -1):
            raise InputError(f"sign: expected +1 or -1, got {sign!r}")
        ctrl = cls(surrogate, sign * float(strength), metric="norm")
        u = ctrl.schedule.amplitudes.to(F64)
        share = u.pow(2) / u.pow(2).sum()
        order = torch.argsort(share, descending=True)
        keep = int(torch.searchsorted(share[order].cumsum(0), torch.tensor(0.9, dtype=F64))) + 1
        ctrl.recommendation = {
            "strategy": "min-norm (least Σu², all layers)",
            "layers": sorted(int(x) for x in order[:keep]),
            "energy_share": {int(x): float(share[x]) for x in order[:keep]},
            "separations": float(strength),
            "strength": float(strength),  # its old name (one release)
            "sign": sign,
            "based_on": "the surrogate's gains h_l"
            + ("; strength calibrated on the given prompts" if model is not None else ""),
        }
        if model is not None:
            if prompts is None:
                raise InputError("prompts: recommend(model=...) needs prompts to calibrate on")
            from .fisher import kl_metric
            from .predictors import gain_per_kl
            from .regime import Continuations

            # where one layer alone steers best per unit of side effect: h_l²/F_ll, the
            # predictor that tracked the judged per-layer effect best (docs/results.md)
            kp = prompts.prompt_ids if isinstance(prompts, Continuations) else prompts
            per_kl = gain_per_kl(ctrl.G[0, 0], kl_metric(model, kp, surrogate))
            rank = torch.argsort(per_kl, descending=True)
            ctrl.recommendation.update(
                best_single_layer=int(rank[0]),
                layer_ranking=[int(x) for x in rank],
                gain_per_kl=[float(x) for x in per_kl],
            )
            ctrl.recommendation["based_on"] += "; single-layer ranking by h_l²/F_ll (KL metric)"
            ctrl.calibrate(model, prompts, n_tokens=n_tokens)
            ctrl.recommendation["multiplier"] = ctrl.calibration.multiplier
        return ctrl

    @property
    def calibrated(self) -> Schedule | None:
        """The calibrated schedule (None before `calibrate`)."""
        return None if self.calibration is None else self.calibration.schedule

    def energies(self, schedule: Schedule | None = None) -> dict[str, float]:
        """A schedule's energy in each metric: Σu² ("norm"), raw, and this Controller's."""
        sched = schedule or self.calibrated or self.schedule
        u = sched.amplitudes.to(F64)
        out = {"norm": sched.energy, "raw": sched.raw_energy}
        if self.single and self.metric.name not in ("norm", "raw"):
            e = self.metric.energy(u)
            out[self.metric.name] = 0.5 * e if self.metric.name == "kl" else e
        return out

    @property
    def schedule(self) -> Schedule:
        """The least-norm schedule in `metric` with G u = target on the allowed layers
        (surrogate-sized: `calibrate` rescales it on the full model)."""
        k, L = len(self.surrogates), self.n_layers
        m = self._mask()
        if self.single:
            u = least_norm(self.G[0, 0], float(self.target[0]), self.metric.W, self.layers)
            u = u[None]
        else:
            Gm = (self.G * m).reshape(k, k * L)  # [k, kL], disallowed layers zeroed
            w = self.metric.W.diagonal().to(F64)
            if not torch.allclose(self.metric.W, torch.diag(w)):
                raise InputError("several concepts: the metric must be diagonal (norm/raw/weights)")
            winv = (1 / w).repeat(k)  # same per-layer weight for every concept
            GW = Gm * winv
            u = winv * (Gm.T @ torch.linalg.pinv(GW @ Gm.T) @ self.target)
        u = (u.reshape(k, L) * m).contiguous()
        name = "llv" if self.metric.name == "norm" else f"least-{self.metric.name}"
        return self._make(u, name)

    def baseline(self, kind: str, *, seed: int | None = None) -> Schedule:
        """Heuristic schedules sized (under the surrogate) to hit the target.

        kind: "uniform" (equal amplitude on every allowed layer), "last" (the last allowed
        layer), "single:<l>" (layer l), "random" (one allowed layer drawn with `seed`).
        """
        L = self.n_layers
        if kind == "uniform":
            pattern = self._mask()
        elif kind == "last":
            pattern = torch.zeros(L, dtype=F64)
            pattern[self.layers[-1]] = 1
        elif kind == "random":
            rng = np.random.default_rng(self.seed if seed is None else seed)
            pick = int(rng.choice(self.layers))
            pattern = torch.zeros(L, dtype=F64)
            pattern[pick] = 1
            kind = f"random:{pick}"
        elif kind.startswith("single:"):
            try:
                layer = int(kind.split(":", 1)[1])
            except ValueError:
                raise InputError(f"kind: expected 'single:<layer>', got {kind!r}") from None
            if layer not in self.layers:
                raise LayerError(f"kind: layer {layer} is not among the allowed {self.layers}")
            pattern = torch.zeros(L, dtype=F64)
            pattern[layer] = 1
        else:
            raise InputError(
                f"kind: expected 'uniform', 'last', 'random' or 'single:<l>', got {kind!r}"
            )
        Gw = torch.einsum("ijl,l->ij", self.G, pattern)  # [k, k]
        if torch.linalg.matrix_rank(Gw) < Gw.shape[0]:
            raise InputError(
                f"baseline {kind!r}: the surrogate predicts no (or degenerate) effect from that "
                "layer pattern; it cannot reach the target"
            )
        a = torch.linalg.solve(Gw, self.target)  # [k]
        return self._make(a[:, None] * pattern[None], kind)


def _regime_of(positions) -> str:
    """The regime.py policy a hooks position policy steers generation in."""
    if positions in ("last", "generated"):
        return "generated"
    if positions == "all":
        return "all"
    raise InputError(
        f"positions: calibration supports 'last', 'generated' and 'all', got {positions!r}"
    )


def _scale_of(s) -> torch.Tensor:
    """scale_l used by a surrogate: B[l] = scale_l * Abar_l[:, 0], stored in its metadata."""
    sc = s.meta.get("scale")
    if sc is None:
        raise InputError("surrogate: metadata lacks 'scale' (refit with this steerlin version)")
    return torch.as_tensor(sc, dtype=F64)[: s.n_layers]


def surrogate_cross_gains(si, sj) -> Float[torch.Tensor, " L"]:
    """Gains of readout i per unit injection along concept j, from surrogate i's model.

    The injection b^j_l is projected onto surrogate i's basis at layer l and propagated by
    its reduced dynamics: h^{ij}_l = c_i^T A_{L-1} ... A_{l+1} A_l P_l^T b^j_l. Exact when b^j_l
    lies in span(P^i_l); otherwise it keeps only the part the basis sees (measure with
    `steerlin.cross_gains` for the exact first-order value).
    """
    if not hasattr(si, "A"):
        raise InputError(
            "several concepts from measured gains: pass coupling= (steerlin.cross_gains), the "
            "cross-gains cannot be predicted without a surrogate's reduced dynamics"
        )
    bj = sj.P[:-1, :, 0] * _scale_of(sj)[:, None]  # [L, H]
    r = torch.einsum("lhd,lh->ld", si.P[:-1], bj)  # P^i_l^T b^j_l  [L, d]
    B = torch.einsum("lij,lj->li", si.A, r)  # [L, d]
    return gains_from_reduced(si.A, B, si.c)


__all__ = ["Controller", "GainModel", "Schedule", "surrogate_cross_gains"]
