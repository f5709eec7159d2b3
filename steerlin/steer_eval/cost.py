"""What producing a strategy's schedules costs: wall seconds and full-model forward tokens.

`ForwardCounter` counts the token positions of every full forward (a hook on the first block's
input: generation, calibration, scoring and context building all pass there); `Cost` adds the
seconds and tokens of a step; `cost_of` adds a strategy's shared steps (directions, fit, exact
gains, KL metric) to its own (calibrations per |t|, or the search). The single-token JVP/VJP
passes of the fit and of exact gains bypass the full forward: their cost is in the seconds only.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class ForwardCounter:
    """Counts full-model forward token positions (batch x sequence at the first block's input)
    while active; `with counter:` adds the hook and always removes it."""

    def __init__(self, model):
        self.model, self.tokens, self._ctx = model, 0, None

    def _hook(self, x, hook):
        self.tokens += int(x.shape[0]) * int(x.shape[1])

    def __enter__(self):
        from .. import backend
        from ..hooks import resid_pre_name

        self._ctx = backend.get(self.model).hooks(self.model, [(resid_pre_name(0), self._hook)])
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        ctx, self._ctx = self._ctx, None
        return ctx.__exit__(*exc)


class Cost:
    """Wall seconds and full-model forward tokens of one step: `with cost.measure(model):`."""

    def __init__(self, seconds: float = 0.0, tokens: int = 0):
        self.seconds, self.tokens = float(seconds), int(tokens)

    def measure(self, model):
        @contextmanager
        def run():
            t0 = time.perf_counter()
            with ForwardCounter(model) as c:
                try:
                    yield self
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.tokens += c.tokens

        return run()

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.seconds + other.seconds, self.tokens + other.tokens)

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "forward_tokens": self.tokens}


def shared_costs(steps: dict[str, Cost], needs: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    """Each strategy's shared steps, added in the order it names them: {strategy: Cost.to_dict}
    for every strategy that names any (`needs`: {strategy: step names in `steps`})."""
    out = {}
    for name, want in needs.items():
        if want:
            total = steps[want[0]]
            for step in want[1:]:
                total = total + steps[step]
            out[name] = total.to_dict()
    return out


def cost_of(result: dict, name: str, t: float) -> dict | None:
    """Seconds and forward tokens to produce strategy `name`'s ±t schedules: its shared steps
    (result["shared_costs"][name], e.g. directions + fit) plus its own (calibrations at |t|,
    or the whole search)."""
    own = result.get("costs", {}).get(name)
    if own is None:
        return None
    own = own.get("search") or own.get(f"{t:g}")
    if own is None:
        return None
    shared = result.get("shared_costs", {}).get(name, {"seconds": 0.0, "forward_tokens": 0})
    return {k: own[k] + shared[k] for k in ("seconds", "forward_tokens")}
