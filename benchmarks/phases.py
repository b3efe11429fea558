"""Per-phase wall time of a training step, measured from outside the code it times.

``PhaseClock`` attributes time exclusively: a phase nested in another (the vision
tower inside the prefill, the prefill inside generation) is subtracted from its
parent, so the phases of a step add up to the time they cover. Phases are opened
by wrapping functions (``patch``) and by forward hooks on modules (``hook``); the
library under test is not edited. On CUDA the clock synchronises at every phase
boundary, so GPU work is charged to the phase that queued it.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable


class PhaseClock:
    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, start, seconds spent in nested phases]

    def push(self, name: str) -> None:
        if self.sync is not None:
            self.sync()
        self._stack.append([name, time.perf_counter(), 0.0])

    def pop(self) -> None:
        if self.sync is not None:
            self.sync()
        name, start, nested = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] += elapsed - nested
        if self._stack:
            self._stack[-1][2] += elapsed

    def inside(self, name: str) -> bool:
        return any(frame[0] == name for frame in self._stack)

    def wrap(self, fn: Callable, name: str | Callable[..., str]) -> Callable:
        """``fn`` timed as phase ``name`` (or ``name(*args, **kwargs)``, chosen per call)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.push(name(*args, **kwargs) if callable(name) else name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.pop()

        return timed

    def patch(self, owner, attribute: str, name: str | Callable[..., str]) -> None:
        """Replace ``owner.attribute`` (a module global, a class or an instance method) by its timed version."""
        setattr(owner, attribute, self.wrap(getattr(owner, attribute), name))

    def hook(self, module, name: Callable[[dict], str]) -> None:
        """Time every forward of ``module``; ``name(kwargs)`` picks the phase from the call's keyword arguments."""

        def before(mod, args, kwargs):
            self.push(name(kwargs))

        def after(mod, args, kwargs, output):
            self.pop()

        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after, with_kwargs=True)

    def take(self) -> dict[str, float]:
        """The totals since the last call, and a fresh start."""
        out = dict(self.totals)
        self.totals.clear()
        return out


# Phase names shared by both systems, in the order the report prints them.
PHASES = (
    "data (images, chat template, tokens)",
    "vision tower (generation)",
    "prefill (text layers)",
    "decode forward",
    "decode loop (sampling, cache, Python)",
    "vision tower (training)",
    "log-prob forward (text layers)",
    "log-softmax",
    "entropy",
    "loss",
    "backward",
    "grad clip",
    "optimizer step",
    "rewards",
    "rollout callbacks",
    "logging",
)
OTHER = "other (trainer loop, bookkeeping)"


def model_phase(clock: PhaseClock) -> Callable[[dict], str]:
    """The phase of a forward of the whole model: prefill or decode inside generation, else the log-prob pass.

    Inside generation a forward over more than one new token is the prefill (``transformers``
    5 encodes the images before it and passes their features, not ``pixel_values``).
    """

    def name(kwargs: dict) -> str:
        if clock.inside("decode loop (sampling, cache, Python)"):
            input_ids = kwargs.get("input_ids")
            return "prefill (text layers)" if input_ids is not None and input_ids.shape[-1] > 1 else "decode forward"
        return "log-prob forward (text layers)"

    return name


def vision_phase(clock: PhaseClock) -> Callable[[dict], str]:
    def name(kwargs: dict) -> str:
        return "vision tower (generation)" if clock.inside("decode loop (sampling, cache, Python)") else "vision tower (training)"

    return name
