"""Sign lock-in: keep trained sign carriers on the side they started from.

    gap initialisation    w ← s0 · (g + |w|)
    outward drift         R = λ Σ relu(ε − s0 ⊙ w)

s0 is each carrier's sign when training starts (ties → +1, as ``Format.snap`` does). A
carrier whose latent drifts to within ε of zero, or past it, is pushed back out on its own
side with gradient λ. Stable signs can be stored cheaply (initial signs + a sparse flip
mask); the flip rate in the report says how sparse.
"""

from __future__ import annotations

import math

import attrs
import torch

from onecomp import ConfigError, Regularizer, in_range


def _finite(instance, attribute, value):
    if not math.isfinite(value):
        raise ConfigError(attribute.name, f"must be finite, got {value!r}")


@attrs.define
class SignLockConfig:
    strength: float = attrs.field(default=1e-3, validator=[in_range(0, None), _finite])  # λ
    epsilon: float = attrs.field(default=0.05, validator=[in_range(0, None), _finite])  # ε, the margin
    gap: float = attrs.field(default=0.0, validator=[in_range(0, None), _finite])  # g, added to |w| at init
    relative: bool = True  # ε and g are fractions of each tensor's mean |w| at init


class SignLock(Regularizer):
    """Regularizer on sign latents: gap init, hinge penalty toward s0, flip counting.

    State accumulates over ``init`` calls with disjoint keys (one per block); ``finish``
    records a tensor's final flip count and drops its per-carrier state.
    """

    name = "signlock"
    Config = SignLockConfig
    targets = "sign"

    def __init__(self, config=None):
        super().__init__(config)
        self._s0: dict[str, torch.Tensor] = {}  # bool: s0 == +1
        self._last: dict[str, torch.Tensor] = {}  # bool: sign at the previous step, for flip events
        self._eps: dict[str, float] = {}  # absolute margin per tensor
        self._carriers: dict[str, int] = {}
        self._flipped: dict[str, int] = {}  # latest count: from the last step, or final after finish
        self._events = 0
        self._steps = 0
        self._peak = 0.0

    def _state(self, key: str) -> torch.Tensor:
        if key not in self._s0:
            why = "was already finished" if key in self._flipped else "was not passed to init()"
            raise KeyError(f"signlock: tensor {key!r} {why}")
        return self._s0[key]

    @torch.no_grad()
    def init(self, params) -> None:
        """Record s0 per tensor and, with g > 0, move every |w| out by g in place."""
        cfg = self.config
        for key, w in params.items():
            if not torch.isfinite(w).all():
                raise ValueError(f"signlock: tensor {key!r} has non-finite values")
            s0 = w >= 0
            scale = w.abs().float().mean().item() if cfg.relative and w.numel() else 1.0
            scale = scale if scale > 0 else 1.0  # an all-zero tensor: fall back to absolute units
            if cfg.gap > 0:
                mag = w.abs() + cfg.gap * scale
                w.copy_(torch.where(s0, mag, -mag))
            self._s0[key], self._last[key] = s0, s0.clone()
            self._eps[key] = cfg.epsilon * scale
            self._carriers[key] = w.numel()
            self._flipped[key] = 0

    def penalty(self, params) -> torch.Tensor:
        """λ Σ relu(ε − s0 ⊙ w) over every given tensor."""
        lam = self.config.strength
        if lam == 0 or not params:
            device = next(iter(params.values())).device if params else None
            return torch.zeros((), device=device)
        terms = []
        for key, w in params.items():
            s0 = self._state(key)
            terms.append(torch.relu(self._eps[key] - torch.where(s0, w, -w)).sum())
        return lam * torch.stack(terms).sum()

    @torch.no_grad()
    def _count(self, params) -> tuple[dict[str, int], int]:
        """Carriers off s0 per tensor, and sign changes since the last count (one sync)."""
        keys = list(params)
        now = {k: params[k] >= 0 for k in keys}
        counts = [(now[k] != self._state(k)).sum() for k in keys]
        changes = [(now[k] != self._last[k]).sum() for k in keys]
        values = torch.stack(counts + changes).tolist() if keys else []
        for k in keys:
            self._last[k] = now[k]
        return dict(zip(keys, values[:len(keys)])), sum(values[len(keys):])

    def step(self, params) -> None:
        """After an optimizer step: current flips, flip events, peak flip rate."""
        flipped, events = self._count(params)
        self._flipped.update(flipped)
        self._events += events
        self._steps += 1
        carriers = sum(self._carriers[k] for k in flipped)
        if carriers:
            self._peak = max(self._peak, sum(flipped.values()) / carriers)

    def finish(self, params) -> None:
        """The kept values (a refiner may have restored an earlier state): their carriers off s0
        are the final flips. Per-carrier state is dropped."""
        flipped, _ = self._count(params)
        self._flipped.update(flipped)
        for k in flipped:
            del self._s0[k], self._last[k]

    def report(self) -> dict:
        carriers = sum(self._carriers.values())
        flipped = sum(self._flipped.values())
        return {
            "carriers": carriers,
            "flipped": flipped,
            "flip_rate": flipped / carriers if carriers else 0.0,
            "flip_events": self._events,  # sign changes between consecutive steps, flips back included
            "peak_flip_rate": self._peak,  # highest flip rate seen after any step
            "steps": self._steps,
            "tensors": len(self._carriers),
        }
