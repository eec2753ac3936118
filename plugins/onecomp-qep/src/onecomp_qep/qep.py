"""QEP: quantize a corrected target fitted to the inputs the quantized model really produces.

    W* = W + α · W (X − X̂)ᵀ X̂ (Ĥ + λI)⁻¹,   Ĥ = X̂ᵀX̂,  λ = percdamp · mean(diag Ĥ)

X is the layer's input on the fp path, X̂ on the already-quantized path. The damping is
at least ``sample_damp · in / N`` (N calibration tokens): the correction is a regression
with ``in`` unknowns per row fitted on N samples, and with few samples per unknown it
fits the calibration text's noise (see the README's "Damping" section). Both products
come from accumulated statistics (``cross`` = 2/N (X − X̂)ᵀX̂ and ``hessian`` = 2/N X̂ᵀX̂;
the common 2/N cancels), so memory is O(in²) per input group. The pipeline then hands
W* and Ĥ to whichever quantizer the config names.
"""

from __future__ import annotations

import attrs
import torch

from onecomp import FormatError, LayerTask, Refiner, in_range, matches


@attrs.define
class QEPConfig:
    alpha: float = attrs.field(default=0.5, validator=in_range(0, 1))
    percdamp: float = attrs.field(default=0.01, validator=in_range(0, None))
    sample_damp: float = attrs.field(default=1.0, validator=in_range(0, None))  # damping ≥ this · in / N
    skip: list = attrs.Factory(lambda: ["mlp.down_proj"])  # name suffixes or "re:<regex>"
    shared_hessian: bool = True  # fused groups (q/k/v, gate/up) reuse one factorisation of Ĥ + λI


def _damped_cholesky(H_hat: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Cholesky factor of Ĥ + λI in fp64, retrying with 10× damping while it fails."""
    H = H_hat.double()
    if not bool(torch.isfinite(H).all()):
        raise FormatError("QEP: Ĥ holds NaN or Inf values (non-finite calibration activations)")
    mean_diag = H.diagonal().mean().clamp(min=1e-12)
    damp = percdamp
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * torch.eye(H.shape[0], dtype=H.dtype))
        if info.item() == 0:
            return L
        damp = max(damp * 10, 1e-6)
    raise FormatError(f"QEP: Ĥ + λI is not positive definite even with damping {damp / 10:g} × mean(diag Ĥ)")


def qep_correct(W: torch.Tensor, H_hat: torch.Tensor, cross: torch.Tensor, alpha: float = 0.5,
                percdamp: float = 0.01, L: torch.Tensor | None = None) -> torch.Tensor:
    """The corrected target W* ``[out, in]`` (``L``: a precomputed factor of Ĥ + λI)."""
    if alpha == 0:
        return W.clone()
    if L is None:
        L = _damped_cholesky(H_hat, percdamp)
    R = (W.double() @ cross.double())  # W (X − X̂)ᵀ X̂, up to the 2/N shared with Ĥ
    correction = torch.cholesky_solve(R.T, L).T  # R (Ĥ + λI)⁻¹, Ĥ symmetric
    return (W.double() + alpha * correction).to(W.dtype)


class QEP(Refiner):
    """Layer-scope refiner: replaces the quantizer's target W by the QEP-corrected W*."""

    name = "qep"
    Config = QEPConfig
    scope = "layer"
    needs = frozenset({"hessian", "cross"})

    def __init__(self, config=None):
        super().__init__(config)
        self._factor: tuple[torch.Tensor, torch.Tensor] | None = None  # (Ĥ, its factor), Ĥ kept alive

    def damping(self, in_features: int, n_tokens: int) -> float:
        """λ as a fraction of mean(diag Ĥ): ``percdamp``, raised to ``sample_damp · in / N`` when
        the calibration set is small (N unknown, 0: ``percdamp`` alone)."""
        if n_tokens <= 0:
            return self.config.percdamp
        return max(self.config.percdamp, self.config.sample_damp * in_features / n_tokens)

    def applies_to(self, layer_name: str) -> bool:
        return not matches(layer_name, self.config.skip)

    def adjust(self, task: LayerTask) -> LayerTask:
        H_hat, cross = task.stats.H, task.stats.cross
        if H_hat is None or cross is None:
            raise ValueError(f"{task.name}: qep needs the 'hessian' and 'cross' statistics")
        if self.config.alpha == 0:
            return task
        percdamp = self.damping(task.W.shape[1], task.stats.n_tokens)
        L = None
        if self.config.shared_hessian:
            if self._factor is None or self._factor[0] is not H_hat:
                self._factor = (H_hat, _damped_cholesky(H_hat, percdamp))
            L = self._factor[1]
        W_star = qep_correct(task.W, H_hat, cross, self.config.alpha, percdamp, L)
        return attrs.evolve(task, W=W_star)
