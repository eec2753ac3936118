"""Planner ``autobit``: each fused input group's quantizer and config, by an integer linear program
that minimises the summed error estimate under a bit budget (see ilp.py and costs.py)."""

from __future__ import annotations

import math
import time

import attrs
import numpy as np
import torch

from onecomp import ConfigError, Planner, in_range, matches, one_of, output_grad_squares, positive

from .costs import layer_cost, quantized_cost, statistics_for
from .ilp import InfeasibleBudget, solve, total


def default_candidates(registry) -> list[dict]:
    """gptq at 2/3/4/8 bits × group size 64, 128 and per channel; mdbf at 1, 1.5 and 2 bits if installed."""
    out = [{"name": "gptq", "bits": b, "group_size": g} for b in (2, 3, 4, 8) for g in (64, 128, -1)]
    if "mdbf" in registry.names("quantizer"):
        out += [{"name": "mdbf", "target_bpw": t} for t in (1.0, 1.5, 2.0)]
    return out


def _optional_positive(inst, attribute, value):
    if value is not None:
        in_range(0, None, lo_open=True)(inst, attribute, value)


@attrs.define
class AutoBitConfig:
    #: quantizer tables ({name = "gptq", bits = 3, ...}); empty: gptq 2/3/4/8 bits × g64/g128/per channel,
    #: and mdbf at 1/1.5/2 bits when installed
    candidates: list = attrs.Factory(list)
    #: "activation": Σ (ΔW)² · E[x²] from calibration's diagonal statistics; "fisher": the same, each
    #: output channel also weighted by E[(∂L/∂y)²] (a diagonal Fisher); "rtn": Σ (ΔW)², no data
    cost: str = attrs.field(default="activation", validator=one_of("activation", "fisher", "rtn"))
    #: "diag": each candidate's ``estimate`` against E[x²] per input channel (cheap); "full": each candidate
    #: really quantizes the layer with its whole input Hessian, and its output error Σ (ΔW E[xxᵀ] ΔWᵀ) is
    #: priced (one quantization per layer and candidate; statistics of d² per input group, all held at once)
    inputs: str = attrs.field(default="diag", validator=one_of("diag", "full"))
    #: calibration windows run forward and backward for the "fisher" cost's output gradients
    grad_windows: int = attrs.field(default=32, validator=positive)
    #: average stored bits per weight over the planned layers (scales, zeros and indices included)
    target_bpw: float | None = attrs.field(default=None, validator=_optional_positive)
    #: bytes of the whole stored model (planned layers as stored, every other tensor as it is)
    max_bytes: int | None = attrs.field(default=None, validator=_optional_positive)
    #: "auto": max_bytes = the backend's reported free memory × (1 − headroom)
    budget: str | None = attrs.field(default=None, validator=one_of(None, "auto"))
    headroom: float = attrs.field(default=0.25, validator=in_range(0, 1, hi_open=True))
    ignore: list = attrs.Factory(list)  # exact names, suffixes like "mlp.down_proj", or "re:<regex>"
    time_limit: float = attrs.field(default=60.0, validator=in_range(0, None, lo_open=True))  # solver seconds

    def __attrs_post_init__(self):
        given = [k for k in ("target_bpw", "max_bytes", "budget") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(given[1], f"give one budget, not {' and '.join(given)}")


class AutoBit(Planner):
    """Mixed precision under a budget: one candidate per fused group, chosen by a binary ILP.

    With no budget field, the budget is the stored bits of the uniform plan with ``[plan] quantizer``
    (which then joins the candidates): AutoBit at exactly the bits of that uniform setting."""

    name = "autobit"
    Config = AutoBitConfig
    needs = frozenset({"model", "diag", "hessian", "windows", "capabilities"})

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if c.inputs == "full" and c.cost == "rtn":
            raise ConfigError("plan.planner.inputs", 'inputs = "full" prices errors against calibration data; '
                              'use it with cost = "activation" or "fisher", not "rtn"')
        data = {"hessian"} if c.inputs == "full" else {"diag"}
        self.needs = frozenset({"model"} | (data if c.cost in ("activation", "fisher") else set())
                               | ({"windows"} if c.cost == "fisher" else set())
                               | ({"capabilities"} if c.budget == "auto" else set()))
        self.summary: dict = {}

    def report(self) -> dict:
        return self.summary

    def candidates(self, quantizer, registry) -> list:
        tables = self.config.candidates or default_candidates(registry)
        specs = [registry.resolve("quantizer", t, f"plan.planner.candidates[{i}]") for i, t in enumerate(tables)]
        if quantizer is not None and quantizer not in specs:
            specs.append(quantizer)
        return specs

    def plan(self, inspection, quantizer, registry, *, model, stats=None, capabilities=None, windows=None):
        c = self.config
        t0 = time.perf_counter()
        specs = self.candidates(quantizer, registry)
        quantizers = [registry.create(s) for s in specs]
        shapes = {f"{b.prefix}.{rel}": tuple(shape) for b in inspection.blocks for rel, shape in b.linears.items()}
        groups = [[f"{b.prefix}.{rel}" for rel in g if not matches(f"{b.prefix}.{rel}", c.ignore)]
                  for b in inspection.blocks for g in b.groups]
        groups = [g for g in groups if g]
        names = [n for g in groups for n in g]
        if not names:
            return {}
        weights = sum(shapes[n][0] * shapes[n][1] for n in names)

        bits = np.zeros((len(groups), len(specs)), dtype=np.int64)
        allowed = np.ones_like(bits, dtype=bool)
        for k, q in enumerate(quantizers):
            for g, members in enumerate(groups):
                try:
                    bits[g, k] = sum(q.format_for(shapes[n]).expected_bits(shapes[n]) for n in members)
                except ValueError:  # e.g. mdbf: no rank fits that few bits for this shape
                    allowed[g, k] = False
        budget, source = self._budget(names, shapes, weights, quantizer, registry, model, capabilities)
        smallest = min_bits = sum(int(bits[g, allowed[g]].min()) for g in range(len(groups)))
        if smallest > budget:
            raise self._infeasible(budget, smallest, weights, source)

        cost = np.full(bits.shape, np.inf)
        from tqdm.auto import tqdm

        out_weights = {}
        if c.cost == "fisher":
            out_weights = output_grad_squares(model, inspection, windows[: c.grad_windows], progress=True)
        for g, members in enumerate(tqdm(groups, desc="autobit costs", unit="group", disable=None, leave=False)):
            for n in members:
                W = model.get_submodule(n).weight.detach().to(torch.float32)
                if c.inputs == "full":
                    layer = stats[n]
                elif c.cost in ("activation", "fisher"):
                    layer = stats[n]
                    diag, n_tokens = layer.diag.float(), layer.n_tokens
                else:
                    diag, n_tokens = torch.ones(W.shape[1]), 0
                for k, q in enumerate(quantizers):
                    if not allowed[g, k]:
                        continue
                    if c.inputs == "full":
                        err = quantized_cost(q, n, W, layer, out_weights.get(n))
                    else:
                        err = layer_cost(q, n, W, statistics_for(q, diag, n_tokens), diag, out_weights.get(n))
                    cost[g, k] = err if not math.isfinite(cost[g, k]) else cost[g, k] + err
        t_cost = time.perf_counter() - t0
        try:
            choice = solve(cost, bits, budget, c.time_limit)
        except InfeasibleBudget as exc:  # not reached after the check above, kept for a clear message
            raise self._infeasible(budget, exc.smallest, weights, source) from None
        plan = {n: specs[choice[g]] for g, members in enumerate(groups) for n in members}
        used = total(bits, choice)
        labels = [label(s) for s in specs]
        self.summary = {
            "budget_bits": int(budget), "budget_source": source, "planned_bits": int(used),
            "smallest_feasible_bits": int(min_bits), "weights": int(weights),
            "planned_bpw": used / weights, "budget_bpw": budget / weights,
            "cost": c.cost, "inputs": c.inputs, "total_cost": float(total(cost, choice)),
            "layers": {n: {"candidate": labels[choice[g]], "bits_per_weight": _bpw(quantizers[choice[g]], shapes[n])}
                       for g, members in enumerate(groups) for n in members},
            "chosen": {lab: int((choice == k).sum()) for k, lab in enumerate(labels) if (choice == k).any()},
            "cost_seconds": t_cost, "solve_seconds": time.perf_counter() - t0 - t_cost,
        }
        return plan

    def _budget(self, names, shapes, weights, quantizer, registry, model, capabilities) -> tuple[int, str]:
        """The budget in stored bits of the planned layers, and where it came from."""
        c = self.config
        if c.target_bpw is not None:
            return math.floor(c.target_bpw * weights), f"target_bpw = {c.target_bpw}"
        if c.max_bytes is not None or c.budget == "auto":
            if c.budget == "auto":
                free = getattr(capabilities, "free_memory", None)
                if free is None:
                    raise ConfigError("plan.planner.budget", f"backend {getattr(capabilities, 'name', '?')!r} reports "
                                      "no free memory; set target_bpw or max_bytes instead")
                limit = math.floor(free * (1 - c.headroom))
                source = f"auto: {free} free bytes on {capabilities.name} × (1 − headroom {c.headroom})"
            else:
                limit, source = c.max_bytes, f"max_bytes = {c.max_bytes}"
            return 8 * (limit - dense_bytes(model, names)), source
        if quantizer is None:
            raise ConfigError("plan.planner", "autobit needs a budget: target_bpw, max_bytes or budget = \"auto\", "
                              "or a [plan] quantizer whose uniform plan's bits it then matches")
        q = registry.create(quantizer)
        return (sum(q.format_for(shapes[n]).expected_bits(shapes[n]) for n in names),
                f"the uniform plan with {label(quantizer)}")

    def _infeasible(self, budget, smallest, weights, source) -> ConfigError:
        c = self.config
        field = "target_bpw" if c.target_bpw is not None else ("max_bytes" if c.max_bytes is not None else "budget")
        return ConfigError(f"plan.planner.{field}",
                           f"budget {budget} bits ({budget / weights:.4f} bits per weight, from {source}) is "
                           f"infeasible: the smallest feasible is {smallest} bits = {smallest / weights:.4f} bits "
                           f"per weight ({math.ceil(smallest / 8)} bytes of planned layers), every group at its "
                           "cheapest candidate")


def _bpw(quantizer, shape) -> float:
    return quantizer.format_for(shape).expected_bits(shape) / (shape[0] * shape[1])


def dense_bytes(model, names) -> int:
    """Bytes of the model's stored tensors other than the planned layers' weights."""
    from onecomp.checkpoint import tensors_to_save

    planned = {f"{n}.weight" for n in names}
    return sum(t.numel() * t.element_size() for k, t in tensors_to_save(model).items() if k not in planned)


def label(spec) -> str:
    """A short name for a candidate: ``gptq b3 g128``, ``mdbf target_bpw=1.5``."""
    d = spec.to_dict()
    name = d.pop("name")
    if "bits" in d and "group_size" in d:
        g = d.pop("group_size")
        return f"{name} w{d.pop('bits')}{'pc' if g == -1 else f'g{g}'}"
    return name + " " + " ".join(f"{k}={v}" for k, v in d.items() if k in ("target_bpw", "bits", "group_size"))
