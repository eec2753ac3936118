"""LPCD: optimise a submodule's output by cycling over its layers, relaxing one layer at a time in
full precision and projecting it back with a registered quantizer.

A submodule is a set of layers of one decoder block and a point where its output is measured: the
attention output (``attn``, o_proj's input), the residual stream after attention (``mid``) or the
block output (``out``). With T the fp block's value there (fp weights, fp-path input X) and P̂ the
quantized block's (quantized weights, quantized-path input X̂), each step on a layer with fp weight W:

    relax     W_relax = argmin_W' ‖T − P̂(W')‖² + λ‖W' − W‖²
    correct   W* = (1 − α) W + α W_relax
    project   Ŵ = quantizer(W*, Ĥ)             Ĥ = 2/N ÂᵀÂ, Â the layer's input on the quantized path
    accept    Ŵ only if ‖T − P̂‖² does not increase; otherwise the layer keeps its current weights

When the layer's output is added straight to the point (o_proj at ``mid``, down_proj at ``out``),
P̂ = R̂ + ÂW'ᵀ is linear in W' and the relaxation is closed form. With E = T − P̂ under the current
weight Ŵ₀, G = 2/N EᵀÂ and λ = damp · mean(diag Ĥ):

    W_relax = (G + Ŵ₀Ĥ + λW)(Ĥ + λI)⁻¹,    objective(Ŵ) = s − 2⟨Ŵ − Ŵ₀, G⟩ + ⟨(Ŵ − Ŵ₀)Ĥ, Ŵ − Ŵ₀⟩

with s = 2/N ‖E‖², so the accept test needs no further pass. On a single layer whose output is the
point (T = XWᵀ), G + Ŵ₀Ĥ = 2/N WXᵀX̂ and W* is exactly QEP's target W + α W(X − X̂)ᵀX̂(Ĥ + λI)⁻¹.
Elsewhere (q/k through the softmax, v, up through the activation) the relaxation is ``gd_steps``
Adam steps on ‖T − P̂‖², started from W.

With ``token_weights = "rms"``, at the residual-stream points (mid, out) each token's squared error is
weighted by r_t = 1/mean(T_t²): every later layer reads the residual stream through an RMSNorm, which
divides each token by its RMS, so an error matters relative to its token's scale. Without it, the few
tokens with massive residual activations dominate ‖T − P̂‖² and each block's o_proj and down_proj are
fitted to cancel their error. Weighting rows by √r_t keeps every formula above (N counts tokens).
"""

from __future__ import annotations

import time

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from onecomp import LayerTask, Refiner, in_range, matches, one_of, replace_module, stored_bits
from onecomp.calibration import StatsCollector, first_block_inputs, propagate_, run_block, stages_supported
from onecomp.checkpoint import BlockStore, QuantLinear

#: where a submodule's output is read: o_proj's input, the residual stream after attention, the block output
POINTS = ("attn", "mid", "out")
#: the module whose input is each point (``out`` is the block's own output)
_POINT_INPUT_OF = {"attn": "self_attn.o_proj", "mid": "post_attention_layernorm"}

#: each submodule: (layers, point) pairs, each a coordinate-descent problem of its own
SUBMODULES = {
    "residual": ((("self_attn.o_proj",), "mid"), (("mlp.down_proj",), "out")),
    "qk": ((("self_attn.q_proj", "self_attn.k_proj"), "attn"),),
    "vo": ((("self_attn.v_proj", "self_attn.o_proj"), "mid"),),
    "updown": ((("mlp.up_proj", "mlp.down_proj"), "out"),),
}
#: (layer, point) pairs where the point is the residual plus the layer's output: quadratic in the layer
QUADRATIC = frozenset({("self_attn.o_proj", "mid"), ("mlp.down_proj", "out")})


def _check_submodules(inst, attribute, value):
    if not value:
        raise ValueError(f"submodules: name at least one of {', '.join(SUBMODULES)}")
    for v in value:
        if v not in SUBMODULES:
            raise ValueError(f"submodules: unknown submodule {v!r}; allowed: {', '.join(SUBMODULES)}")


def _check_quantizer(inst, attribute, value):
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ValueError(f"quantizer: must be a table naming a registered quantizer, "
                         f"e.g. {{name = \"gptq\", bits = 3}}, got {value!r}")


@attrs.define
class LPCDConfig:
    #: any of residual (o_proj, down_proj against the residual stream), qk, vo, updown
    submodules: list = attrs.field(factory=lambda: ["residual"], validator=_check_submodules)
    steps: int = attrs.field(default=1, validator=in_range(1, 100))  # alternating passes over each submodule's layers
    #: "closed_form": closed form where the objective is quadratic in the layer, else gradient steps; "gd": always gradient steps
    relax: str = attrs.field(default="closed_form", validator=one_of("closed_form", "gd"))
    gd_steps: int = attrs.field(default=20, validator=in_range(1, 100_000))
    lr: float = attrs.field(default=1e-4, validator=in_range(0, 1, lo_open=True))
    alpha: float = attrs.field(default=0.5, validator=in_range(0, 1))  # correction strength
    percdamp: float = attrs.field(default=0.01, validator=in_range(0, None))  # λ as a fraction of mean(diag Ĥ)
    sample_damp: float = attrs.field(default=1.0, validator=in_range(0, None))  # λ ≥ this · in / N, as QEP
    #: the projection: a registered quantizer and its config; must not store more bits than the layer has
    quantizer: dict = attrs.field(factory=lambda: {"name": "gptq"}, validator=_check_quantizer)
    #: layers left as the pivot has them (name suffixes such as "mlp.down_proj", or "re:<regex>")
    skip: list = attrs.Factory(list)
    #: "rms": at the residual-stream points (mid, out) each token's error counts relative to that token's
    #: RMS in the fp target, as the next RMSNorm reads it; "none": the plain squared error
    token_weights: str = attrs.field(default="rms", validator=one_of("rms", "none"))


def _damped_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Cholesky factor of H + λI in fp64 and the λ used, retrying with 10× damping while it fails."""
    H = H.double()
    mean_diag = float(H.diagonal().mean().clamp(min=1e-12))
    damp = percdamp
    for _ in range(8):
        lam = damp * mean_diag
        L, info = torch.linalg.cholesky_ex(H + lam * torch.eye(H.shape[0], dtype=H.dtype))
        if info.item() == 0:
            return L, lam
        damp = max(damp * 10, 1e-6)
    raise ValueError("LPCD: Ĥ + λI is not positive definite even with heavy damping")


def closed_form_target(W: torch.Tensor, W0: torch.Tensor, G: torch.Tensor, H: torch.Tensor, alpha: float = 0.5,
                       percdamp: float = 0.01) -> torch.Tensor:
    """W* = (1 − α)W + α(G + Ŵ₀Ĥ + λW)(Ĥ + λI)⁻¹ for a layer whose output adds to the point (module doc)."""
    L, lam = _damped_cholesky(H, percdamp)
    C = G.double() + W0.double() @ H.double() + lam * W.double()
    W_relax = torch.cholesky_solve(C.T, L).T  # C (Ĥ + λI)⁻¹, Ĥ symmetric
    return ((1 - alpha) * W.double() + alpha * W_relax).to(W.dtype)


def step_objective(s: float, G: torch.Tensor, H: torch.Tensor, D: torch.Tensor) -> float:
    """2/N ‖E − ÂDᵀ‖² from the statistics: the point error once the layer's weight moves by D."""
    D, G, H = D.double(), G.double(), H.double()
    return float(s - 2 * (D * G).sum() + ((D @ H) * D).sum())


#: points on the residual stream, which every later layer reads through an RMSNorm
RESIDUAL_POINTS = frozenset({"mid", "out"})


def token_weights(T: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 / mean_c(T²)`` per token, shaped to broadcast over ``T``'s last dim: the factor by which the next
    RMSNorm scales a small change of that token's residual vector (its own scale, not the error's)."""
    return 1.0 / (T.float().square().mean(-1, keepdim=True) + eps)


class _Stop(Exception):
    pass


def _run_to(block: nn.Module, h: torch.Tensor, kw: dict, point: str, capture=()) -> tuple[torch.Tensor, dict]:
    """The block's value at ``point`` for one batch (the rest is skipped), and the inputs of ``capture``."""
    seen = {}
    handles = []

    def keep(rel):
        def hook(m, args):
            seen[rel] = args[0]
        return hook

    def stop(m, args):
        seen[point] = args[0]
        raise _Stop

    try:
        for rel in capture:
            handles.append(block.get_submodule(rel).register_forward_pre_hook(keep(rel)))
        if point in _POINT_INPUT_OF:
            handles.append(block.get_submodule(_POINT_INPUT_OF[point]).register_forward_pre_hook(stop))
        try:
            return run_block(block, h, kw), seen
        except _Stop:
            return seen.pop(point), seen
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _fp_targets(block: nn.Module, inputs, points) -> dict:
    """Run the fp block over every batch: its value at each of ``points`` per batch; ``inputs`` become its outputs."""
    targets = {p: [] for p in points}
    for i, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        seen = {}
        handles = [block.get_submodule(_POINT_INPUT_OF[p]).register_forward_pre_hook(
            lambda m, args, p=p: seen.__setitem__(p, args[0])) for p in points if p != "out"]
        try:
            inputs.hidden[i] = None
            inputs.hidden[i] = run_block(block, h, kw)
        finally:
            for handle in handles:
                handle.remove()
        for p in points:
            targets[p].append(inputs.hidden[i] if p == "out" else seen[p])
    return targets


class _Relaxed(nn.Module):
    """A linear layer with a trainable fp weight, swapped in while the gradient relaxation runs."""

    def __init__(self, W: torch.Tensor, bias):
        super().__init__()
        self.W = nn.Parameter(W.clone())
        self.bias = bias

    def forward(self, x):
        return nn.functional.linear(x, self.W.to(x.dtype), self.bias)


class LPCD(Refiner):
    """Block-scope refiner: per block, coordinate descent over the configured submodules' layers."""

    name = "lpcd"
    Config = LPCDConfig
    scope = "block"

    def damping(self, in_features: int, n_tokens: int) -> float:
        """λ as a fraction of mean(diag Ĥ): ``percdamp``, raised to ``sample_damp · in / N`` (QEP's rule)."""
        if n_tokens <= 0:
            return self.config.percdamp
        return max(self.config.percdamp, self.config.sample_damp * in_features / n_tokens)

    def _weighted(self, point: str) -> bool:
        return self.config.token_weights == "rms" and point in RESIDUAL_POINTS

    def problems(self) -> list[tuple[str, tuple, str]]:
        """(label, layers, point) in the order they run: by point along the block, then as configured."""
        probs = [(f"{name}:{point}", layers, point) for name in dict.fromkeys(self.config.submodules)
                 for layers, point in SUBMODULES[name]]
        return sorted(probs, key=lambda p: POINTS.index(p[2]))

    def refine_block(self, ctx) -> dict:
        cfg = self.config
        if ctx.teacher is None:
            raise ValueError("lpcd needs the fp model (the stage's teacher)")
        spec = ctx.registry.resolve("quantizer", cfg.quantizer, "refiners.lpcd.quantizer")
        quantizer = ctx.registry.create(spec)
        model, teacher = ctx.model.eval(), ctx.teacher.eval()
        path = ctx.inspection.blocks_path
        blocks, t_blocks = model.get_submodule(path), teacher.get_submodule(path)
        problems = self.problems()
        points = {p for _, _, p in problems}
        covered = list(dict.fromkeys(rel for _, layers, _ in problems for rel in layers))
        with torch.no_grad():
            q_in = first_block_inputs(model, blocks, ctx.windows, ctx.batch_size)
            fp_in = first_block_inputs(teacher, t_blocks, ctx.windows, ctx.batch_size)
        store = BlockStore(ctx.work_dir)
        rows = []
        bar = tqdm(total=len(blocks), desc="lpcd", unit="block", disable=not ctx.progress)
        for b, info in enumerate(ctx.inspection.blocks):
            block, t_block = blocks[b], t_blocks[b]
            if store.has(b):  # resume: re-apply the refined block
                rows.append(store.apply(b, model, ctx.registry))
                with torch.no_grad():
                    propagate_(t_block, fp_in)
            else:
                if not stages_supported(block, info.groups):
                    raise ValueError(f"lpcd: block {b} ({type(block).__name__}) is not a Llama-style decoder layer "
                                     "(q/k/v, o_proj, gate/up, down_proj with pre-norm residuals)")
                targets = _fp_targets(t_block, fp_in, points)  # fp_in now holds the fp block's outputs
                row = self._refine_block(b, block, t_block, q_in, targets, quantizer, info.prefix, ctx.seed)
                done = {f"{info.prefix}.{rel}": block.get_submodule(rel) for rel in covered
                        if isinstance(block.get_submodule(rel), QuantLinear)}
                store.save(b, done, row)
                rows.append(row)
            if b < len(blocks) - 1:
                with torch.no_grad():
                    propagate_(block, q_in)
            steps = rows[-1]["steps"]
            if steps:
                bar.set_postfix_str(f"{steps[0]['before']:.3e} → {steps[-1]['after']:.3e}")
            bar.update(1)
        bar.close()
        first, last = {}, {}
        for row in rows:
            for s in row["steps"]:
                key = (row["block"], s["submodule"])
                first.setdefault(key, s["before"])
                last[key] = s["after"]
        return {"objective": "2/N ‖T − P̂‖² at each submodule's point, summed over submodules and blocks",
                "loss_before": sum(first.values()), "loss_after": sum(last.values()),
                "accepted": sum(s["accepted"] for r in rows for s in r["steps"]),
                "steps": sum(len(r["steps"]) for r in rows), "quantizer": spec.to_dict(), "blocks": rows}

    def _refine_block(self, b, block, t_block, q_in, targets, quantizer, prefix, seed) -> dict:
        t0 = time.perf_counter()
        steps = []
        for label, layers, point in self.problems():
            present = [rel for rel in layers if isinstance(block.get_submodule(rel), QuantLinear)
                       and not matches(f"{prefix}.{rel}", self.config.skip)]
            for s in range(self.config.steps):
                for rel in present:
                    closed = self.config.relax == "closed_form" and (rel, point) in QUADRATIC
                    step = self._closed_form_step if closed else self._gradient_step
                    rec = step(block, t_block.get_submodule(rel), rel, point, q_in, targets[point], quantizer,
                               f"{prefix}.{rel}", seed)
                    steps.append({"submodule": label, "layer": rel, "pass": s, **rec})
        return {"block": b, "steps": steps, "seconds": time.perf_counter() - t0}

    def _project(self, block, rel, W_star, stats, quantizer, name, seed) -> QuantLinear:
        """Quantize W* and check the projection does not spend more bits than the layer it replaces."""
        layer = block.get_submodule(rel)
        compressed = quantizer.quantize(LayerTask(name=name, W=W_star, stats=stats, bias=layer.bias, group=name,
                                                  seed=seed))
        compressed.format.check(compressed.tensors, compressed.shape)
        if stored_bits(compressed.tensors) > stored_bits(layer.stored()):
            raise ValueError(f"refiners.lpcd.quantizer: {quantizer.name} stores {name} in "
                             f"{stored_bits(compressed.tensors)} bits, more than the {stored_bits(layer.stored())} "
                             "of the layer it replaces; give lpcd the quantizer config the plan used")
        return QuantLinear.from_compressed(compressed, layer.bias)

    @torch.no_grad()
    def _closed_form_step(self, block, fp_layer, rel, point, q_in, targets, quantizer, name, seed) -> dict:
        layer = block.get_submodule(rel)
        W = fp_layer.weight.detach().float()
        W0 = layer.dequantize().float()
        out_f, in_f = W.shape
        collector = StatsCollector(set(quantizer.needs) | {"hessian"}, in_f)
        G = torch.zeros(out_f, in_f)
        s = 0.0
        weighted = self._weighted(point)
        for (h, kw), T in zip(zip(q_in.hidden, q_in.kwargs), targets):
            P_hat, seen = _run_to(block, h, kw, point, (rel,))
            A = seen[rel].reshape(-1, in_f).float()
            E = (T - P_hat).reshape(-1, out_f).float()
            if weighted:  # the objective Σ_t r_t ‖E_t‖² is plain least squares on √r_t-scaled rows
                root = token_weights(T).reshape(-1, 1).sqrt()
                A, E = A * root, E * root
            collector.add(A)
            G.addmm_(E.T, A)
            s += float(E.double().square().sum())
        stats = collector.finish()
        scale = 2 / max(stats.n_tokens, 1)
        G.mul_(scale)
        s *= scale
        W_star = closed_form_target(W, W0, G, stats.H, self.config.alpha, self.damping(in_f, stats.n_tokens))
        new = self._project(block, rel, W_star, stats, quantizer, name, seed)
        projected = step_objective(s, G, stats.H, new.dequantize().float() - W0)
        accepted = projected <= s
        if accepted:
            replace_module(block, rel, new)
        return {"relax": "closed_form", "before": s, "projected": projected, "after": projected if accepted else s,
                "accepted": accepted}

    @torch.no_grad()
    def _measure(self, block, rel, point, q_in, targets, needs) -> tuple[float, object]:
        """2/N ‖T − P̂‖² over the calibration set, and statistics of the layer's input when ``needs``."""
        layer = block.get_submodule(rel)
        collector = StatsCollector(needs, layer.in_features) if needs else None
        err, n = 0.0, 0
        weighted = self._weighted(point)
        for (h, kw), T in zip(zip(q_in.hidden, q_in.kwargs), targets):
            P_hat, seen = _run_to(block, h, kw, point, (rel,) if needs else ())
            r = token_weights(T) if weighted else 1.0
            err += float(((T - P_hat).double().square() * r).sum())
            n += T.shape[0] * T.shape[1]
            if collector is not None:
                A = seen[rel]
                collector.add(A * r.to(A.dtype).sqrt() if weighted else A)
        return 2 * err / max(n, 1), (collector.finish() if collector is not None else None)

    def _gradient_step(self, block, fp_layer, rel, point, q_in, targets, quantizer, name, seed) -> dict:
        layer = block.get_submodule(rel)
        W = fp_layer.weight.detach().float()
        before, stats = self._measure(block, rel, point, q_in, targets, set(quantizer.needs) | {"hessian"})
        W_relax = self._gradient_relax(block, rel, point, q_in, targets, W, layer.bias)
        W_star = ((1 - self.config.alpha) * W + self.config.alpha * W_relax).contiguous()
        new = self._project(block, rel, W_star, stats, quantizer, name, seed)
        replace_module(block, rel, new)
        projected, _ = self._measure(block, rel, point, q_in, targets, ())
        accepted = projected <= before
        if not accepted:  # keep the best iterate
            replace_module(block, rel, layer)
        return {"relax": "gd", "before": before, "projected": projected, "after": projected if accepted else before,
                "accepted": accepted}

    def _gradient_relax(self, block, rel, point, q_in, targets, W, bias) -> torch.Tensor:
        """``gd_steps`` Adam steps on ‖T − P̂‖² over W (from the fp weight), one calibration batch per step."""
        original = block.get_submodule(rel)
        flags = [(p, p.requires_grad) for p in block.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        relaxed = _Relaxed(W, bias)
        replace_module(block, rel, relaxed)
        opt = torch.optim.Adam([relaxed.W], lr=self.config.lr)
        n = len(q_in.hidden)
        weighted = self._weighted(point)
        try:
            with torch.enable_grad():
                for k in range(self.config.gd_steps):
                    i = k % n
                    P_hat, _ = _run_to(block, q_in.hidden[i], q_in.kwargs[i], point)
                    loss = (P_hat.float() - targets[i].float()).square()
                    loss = (loss * token_weights(targets[i]) if weighted else loss).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            replace_module(block, rel, original)
            for p, flag in flags:
                p.requires_grad_(flag)
        return relaxed.W.detach()
