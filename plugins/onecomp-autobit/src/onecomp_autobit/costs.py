"""What each candidate costs on each layer: stored bits (from its format) and an error estimate.

The error is the candidate quantizer's ``estimate`` of Ŵ on the layer's weight, given the statistics
a planner has before any layer is quantized: ``E[x²]`` per input channel (``diag``), and for quantizers that need a
Hessian its diagonal approximation ``H = 2 · diag(E[x²])``. The ``rtn`` cost takes ``E[x²] = 1``
(no data: the plain weight error); ``activation`` uses calibration's ``diag`` statistics:

    cost = Σ_q Σ_p (W − Ŵ)²_qp · E[x_p²]

and ``fisher`` also weighs each output channel by how much the loss reacts to it,
``G_q = E[(∂L/∂y_q)²]`` (``onecomp.output_grad_squares``): with ``F_qp ≈ G_q · E[x_p²]`` the diagonal
Fisher, ``½ Σ F_qp (ΔW_qp)²`` is the second-order estimate of the loss increase, which makes errors
in different layers comparable (an error early in the model, or in a layer the loss is sensitive
to, costs more than the same output error elsewhere).

With ``inputs = "full"`` a planner instead hands each candidate the layer's whole input Hessian and prices
what the candidate really stores (its ``quantize``, dequantized): ``Σ_q out_q · (ΔW E[xxᵀ] ΔWᵀ)_qq``.
That is the same sum when the inputs are uncorrelated, and otherwise counts the error GPTQ-like
quantizers cancel across correlated input channels, which the diagonal estimate cannot see.
"""

from __future__ import annotations

import torch

from onecomp import LayerStats, LayerTask


def statistics_for(quantizer, diag: torch.Tensor, n_tokens: int = 0) -> LayerStats:
    """The LayerStats handed to a candidate: ``diag``, and ``H = 2·diag(diag)`` if it needs a Hessian."""
    needs = set(quantizer.needs)
    unknown = needs - {"diag", "hessian"}
    if unknown:
        raise ValueError(f"candidate {quantizer.name!r} needs {sorted(unknown)}, which a planner cannot supply "
                         "before quantizing; allowed candidates need at most 'diag' and 'hessian'")
    return LayerStats(n_tokens=n_tokens, diag=diag if "diag" in needs else None,
                      H=torch.diag(2 * diag) if "hessian" in needs else None)


def weighted_error(W: torch.Tensor, W_hat: torch.Tensor, diag: torch.Tensor, out: torch.Tensor | None = None) -> float:
    """Σ_qp out_q · (W − Ŵ)²_qp · diag_p: the squared error weighted per input channel (and per output
    channel when ``out`` is given)."""
    per_row = ((W - W_hat).square() * diag[None, :]).sum(1)
    return float(per_row.sum() if out is None else (per_row * out).sum())


def layer_cost(quantizer, name: str, W: torch.Tensor, stats: LayerStats, diag: torch.Tensor,
               out: torch.Tensor | None = None) -> float:
    """One candidate's error on one layer, from its quantizer's ``estimate``."""
    return weighted_error(W, quantizer.estimate(LayerTask(name=name, W=W, stats=stats)), diag, out)


def full_statistics_for(quantizer, stats: LayerStats) -> LayerStats:
    """The LayerStats handed to a candidate when the planner has the full Hessian ``H = 2·E[xxᵀ]``."""
    needs = set(quantizer.needs)
    unknown = needs - {"diag", "hessian"}
    if unknown:
        raise ValueError(f"candidate {quantizer.name!r} needs {sorted(unknown)}, which a planner cannot supply "
                         "before quantizing; allowed candidates need at most 'diag' and 'hessian'")
    return LayerStats(n_tokens=stats.n_tokens, H=stats.H if "hessian" in needs else None,
                      diag=stats.H.diagonal() / 2 if "diag" in needs else None)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, out: torch.Tensor | None = None) -> float:
    """Σ_q out_q · (ΔW·H·ΔWᵀ)_qq / 2 with ΔW = W − Ŵ and H = 2·E[xxᵀ]: the expected squared output error,
    per output channel weighted by ``out`` when given."""
    dW = (W - W_hat).double()
    per_row = ((dW @ H.double()) * dW).sum(1) / 2
    return float(per_row.sum() if out is None else (per_row * out.double()).sum())


def quantized_cost(quantizer, name: str, W: torch.Tensor, stats: LayerStats, out: torch.Tensor | None = None) -> float:
    """One candidate's error on one layer from what it really stores, against the full input Hessian."""
    result = quantizer.quantize(LayerTask(name=name, W=W, stats=full_statistics_for(quantizer, stats)))
    return output_error(W, result.format.dequantize(result.tensors, result.shape), stats.H, out)
