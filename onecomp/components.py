"""The component kinds plugins provide, and the small value types passed between them.

Every component is a class with a unique ``name`` and an attrs ``Config`` class.
Subclassing the bases below is optional (the registry checks the attributes), but
they document the contract and give sensible defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import attrs
import torch
from torch import nn

from .errors import FormatError
from .validation import build_config

KINDS = ("quantizer", "format", "planner", "refiner", "backend", "regularizer")

#: Statistics a quantizer or refiner may declare in ``needs``; only those are captured.
#:   hessian  H = 2/N Σ x̂ x̂ᵀ over the layer input on the quantized path  [in, in]
#:   cross    D = 2/N Σ (x - x̂) x̂ᵀ, fp-path input minus quantized-path input  [in, in]
#:   diag     E[x̂²] per input channel  [in]
#:   samples  up to ``max_samples`` rows of X̂  [n, in]
STATISTICS = frozenset({"hessian", "cross", "diag", "samples"})

#: What a planner may declare in ``needs``, each handed to ``plan`` as a keyword argument:
#:   diag, hessian  statistics of every decoder linear's input, captured in one pass of the calibration
#:                  windows through the fp model before planning: ``stats={linear name: LayerStats}``
#:   model          the fp model itself (its weights): ``model=nn.Module``
#:   capabilities   the run's backend report (e.g. for a memory budget): ``capabilities=BackendCapabilities``
#:   windows        the calibration windows themselves, ``windows=Tensor[n, seq_len]``, for planners that
#:                  measure more than input statistics (e.g. ``onecomp.output_grad_squares`` on a subset)
PLANNER_NEEDS = frozenset({"diag", "hessian", "model", "capabilities", "windows"})

SCOPES = ("layer", "block", "model")


@attrs.define
class NoConfig:
    """Config of a component that takes no parameters."""


# ---------------------------------------------------------------- value types


@attrs.define
class LayerStats:
    """Calibration statistics of one linear layer's input (see STATISTICS)."""

    n_tokens: int = 0
    H: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    samples: torch.Tensor | None = None


@attrs.define
class LayerTask:
    """What a quantizer is asked to compress: one linear layer's fp32 weight and its statistics.

    ``W`` is ``[out, in]``. Layer-scope refiners (QEP) may replace ``W`` with a corrected
    target before the quantizer sees it.
    """

    name: str
    W: torch.Tensor
    stats: LayerStats = attrs.Factory(LayerStats)
    bias: torch.Tensor | None = None
    group: str | None = None
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)


@attrs.define
class Compressed:
    """A weight stored in a registered format: the format instance (bound to its params) and
    the stored tensors it packed."""

    format: "Format"
    tensors: dict[str, torch.Tensor]
    shape: tuple[int, int]
    info: dict = attrs.Factory(dict)  # free-form numbers for reports (loss, seconds)

    @property
    def params(self) -> dict:
        """The format's params as JSON-able values (what the manifest records)."""
        return self.format.to_dict()


@attrs.frozen
class ComponentSpec:
    """A component chosen in a config: its kind, registered name and validated Config."""

    kind: str
    name: str
    config: Any

    def to_dict(self) -> dict:
        return {"name": self.name, **attrs.asdict(self.config, recurse=True)}


def matches(name: str, patterns) -> bool:
    """True if ``name`` equals a pattern, ends with ``.pattern``, or matches a ``re:<regex>`` pattern."""
    import re

    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def stored_bits(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bits actually held by a set of stored tensors."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` under ``root`` (e.g. a QuantLinear for a Linear)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ---------------------------------------------------------------- what stages and hooks are handed


@attrs.define
class RunInfo:
    """What observer hooks learn about the run: its config, output directory, model and plan."""

    config: dict
    out_dir: Path | None
    model: str
    plan: dict = attrs.Factory(dict)


@attrs.define
class StageInfo:
    """A stage of the pipeline: ``layerwise`` or a refiner's name, its scope and 1-based index."""

    name: str
    scope: str
    index: int


@attrs.define
class LayerReport:
    """One quantized linear layer: format, exact bits per weight, relative output error, time."""

    name: str
    format: str
    bits_per_weight: float
    rel_error: float | None
    seconds: float
    info: dict = attrs.Factory(dict)


@attrs.define
class BlockReport:
    """One decoder block finished by the layer-wise stage, with its layers' reports."""

    index: int
    seconds: float
    layers: list


@attrs.define
class CheckpointInfo:
    """A checkpoint directory just written, and its manifest."""

    path: Path
    manifest: dict


@attrs.define
class StageReport:
    """A finished stage: checkpoint, perplexities, bits, time, peak memory and the stage's details."""

    name: str
    index: int
    scope: str
    checkpoint: str
    ppl: dict
    bits: dict
    seconds: float
    peak_rss_mb: float
    details: dict = attrs.Factory(dict)

    def to_dict(self) -> dict:
        return attrs.asdict(self)


@attrs.define
class StageContext:
    """What a block- or model-scope refiner gets: the model, its fp teacher, calibration windows.

    ``work_dir`` holds per-block progress (``onecomp.checkpoint.BlockStore``) so a crashed stage
    resumes; ``regularizers`` are instances, resolved once from the refiner's config."""

    model: nn.Module
    teacher: nn.Module | None
    inspection: Any
    windows: torch.Tensor
    batch_size: int
    registry: Any
    regularizers: list
    seed: int
    progress: bool
    work_dir: Path


@attrs.frozen
class BackendCapabilities:
    """What a backend reports: where it runs, its memory, and which formats it runs natively
    (format name -> bit widths its kernels take; other formats fall back to dequantize-then-matmul)."""

    name: str
    device: str
    free_memory: int | None = None  # bytes
    total_memory: int | None = None  # bytes
    formats: Mapping[str, tuple[int, ...]] = attrs.Factory(dict)
    threads: int | None = None
    notes: str = ""

    def to_dict(self) -> dict:
        d = attrs.asdict(self)
        d["formats"] = {k: list(v) for k, v in self.formats.items()}
        return d


# ---------------------------------------------------------------- component bases


class Format:
    """A storage layout for one weight matrix.

    ``Config`` holds the format's params (bits, group size, ...). An instance is bound
    to one params value. ``fields`` are the logical tensors (integer codes, scales);
    ``stored`` tensors are what goes to safetensors (packed codes). The conformance kit
    in ``onecomp.testing`` checks every format against this contract.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type] = NoConfig
    #: logical float fields (from ``unpack``) a training refiner may tune: scales, envelopes
    trainable: ClassVar[tuple[str, ...]] = ()
    #: logical discrete fields a training refiner may tune through a straight-through estimator,
    #: each mapped to its kind: ``"sign"`` (values ±1) or ``"integer"`` (codes); see ``snap``
    discrete: ClassVar[Mapping[str, str]] = {}

    def __init__(self, params=None):
        self.params = params if params is not None else self.Config()

    @classmethod
    def from_dict(cls, params: Mapping) -> "Format":
        return cls(build_config(cls.Config, dict(params), "params"))

    def to_dict(self) -> dict:
        return attrs.asdict(self.params)

    # -- required
    def pack(self, fields: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(self, stored: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize_fields(self, fields: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The fp32 weight ``[out, in]`` from logical fields; differentiable in the float fields and
        accepting float tensors for the ``discrete`` ones (what training refiners call)."""
        raise NotImplementedError

    def dequantize(self, stored: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The fp32 weight ``[out, in]`` the stored tensors stand for."""
        return self.dequantize_fields(self.unpack(stored, shape), shape)

    def expected_bits(self, shape: tuple[int, int]) -> int:
        """Stored bits for a weight of ``shape``, from the format's formula."""
        raise NotImplementedError

    def example(self, shape: tuple[int, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random valid fields for ``shape`` (drives the conformance kit)."""
        raise NotImplementedError

    # -- provided
    def snap(self, name: str, latent: torch.Tensor) -> torch.Tensor:
        """The nearest allowed value of discrete field ``name`` (as float): the straight-through
        estimator's forward, and what is stored when training ends. Integer formats clamp to
        their code range by overriding this."""
        if self.discrete.get(name) == "sign":
            return torch.where(latent >= 0, 1.0, -1.0).to(latent.dtype)
        return latent.round()

    def latent_init(self, name: str, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The float latent a training refiner starts discrete field ``name`` from;
        ``snap(latent_init(name, f)) == f[name]`` must hold."""
        return fields[name].float()

    def stored_shapes(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names, shapes and dtypes of the stored tensors for ``shape``."""
        g = torch.Generator().manual_seed(0)
        return {k: (tuple(v.shape), v.dtype) for k, v in self.pack(self.example(shape, g), shape).items()}

    def check(self, stored: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> None:
        """Raise FormatError unless ``stored`` has exactly the tensors this format expects."""
        want = self.stored_shapes(shape)
        if set(stored) != set(want):
            raise FormatError(
                f"format {self.name!r}: stored tensors {sorted(stored)} do not match expected {sorted(want)}"
            )
        for k, (s, dt) in want.items():
            t = stored[k]
            if tuple(t.shape) != s or t.dtype != dt:
                raise FormatError(
                    f"format {self.name!r}: tensor {k!r} is {tuple(t.shape)} {t.dtype}, expected {s} {dt}"
                )

    def bits_per_weight(self, stored: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> float:
        return stored_bits(stored) / (shape[0] * shape[1])

    def linear(self, x: torch.Tensor, stored: Mapping[str, torch.Tensor], shape, bias=None) -> torch.Tensor:
        """``x @ Ŵᵀ + bias``; formats with a cheaper kernel than dequantize-then-matmul override it."""
        W = self.dequantize(stored, shape).to(x.dtype)
        return torch.nn.functional.linear(x, W, bias)


class Quantizer:
    """Compresses one linear layer (a LayerTask) into a registered format."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def quantize(self, task: LayerTask) -> Compressed:
        raise NotImplementedError

    def estimate(self, task: LayerTask) -> torch.Tensor:
        """The fp32 ``Ŵ`` a planner prices this quantizer with (``task.stats`` holds only what a planner
        has before quantizing: ``diag``, and ``H = 2·diag(E[x²])`` for quantizers that need a Hessian).
        By default the real result; slow quantizers may return a faster approximation of it."""
        compressed = self.quantize(task)
        return compressed.format.dequantize(compressed.tensors, compressed.shape)

    def format_for(self, shape: tuple[int, int]) -> "Format":
        """The format (bound to its params) ``quantize`` emits for a weight of ``shape``, so a
        planner can count its stored bits with ``expected_bits`` before quantizing."""
        raise NotImplementedError(f"quantizer {self.name!r} does not say which format it emits "
                                  "(Quantizer.format_for), so planners cannot count its bits")


class Refiner:
    """Improves the model at one scope.

    * ``layer``: ``adjust(task) -> task`` before the quantizer runs (e.g. QEP).
    * ``block``: ``refine_block(ctx) -> dict`` after a block is quantized.
    * ``model``: ``refine_model(ctx) -> dict`` after the pivot checkpoint.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    scope: ClassVar[str] = "layer"
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def applies_to(self, layer_name: str) -> bool:
        return True


class Planner:
    """Chooses a quantizer and its config for every linear layer to compress.

    ``needs`` (see PLANNER_NEEDS) says what ``plan`` is handed besides the inspection, as keyword
    arguments; an instance may narrow its class's ``needs`` from its config. Fused layers share one
    LayerStats in ``stats``."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    #: the config must name a quantizer (``[plan] quantizer = {...}``) for this planner
    requires_quantizer: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def plan(self, inspection, quantizer: ComponentSpec | None, registry, **given) -> dict[str, ComponentSpec]:
        raise NotImplementedError

    def report(self) -> dict:
        """After ``plan``: what was chosen and why (e.g. the budget), for ``onecomp inspect --plan``."""
        return {}


class Backend:
    """Where tensors live and how quantized linear layers run.

    ``kernel`` returns a module that computes ``x @ Ŵᵀ + bias`` straight from a format's stored
    tensors, or None to decline; declined layers go to the next backend and finally to the
    format's reference path (dequantize, then matmul). ``capabilities`` is what planners and
    ``onecomp plugins`` read."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def device(self) -> torch.device:
        return torch.device("cpu")

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(self.name, str(self.device()))

    def kernel(self, fmt: "Format", stored: Mapping[str, torch.Tensor], shape: tuple[int, int],
               bias: torch.Tensor | None) -> nn.Module | None:
        return None


class Regularizer:
    """Adds a penalty to a training refiner's loss, with init and step callbacks.

    A training refiner passes each method the tensors it trains that match ``targets``
    (``"all"``, ``"continuous"``, ``"sign"`` or ``"integer"``), keyed ``"<module>.<field>"``:
    ``init`` once before training (it may edit them in place), ``penalty`` every step
    (added to the loss), ``step`` after every optimizer step, ``finish`` with the values kept
    at the end; ``report`` goes to the stage report. A block-wise refiner calls
    ``init … finish`` once per block with that block's tensors (disjoint keys), so state must
    accumulate across calls and ``report`` covers every key seen.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    targets: ClassVar[str] = "all"

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def init(self, params: Mapping[str, torch.Tensor]) -> None:
        pass

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.zeros(())

    def step(self, params: Mapping[str, torch.Tensor]) -> None:
        pass

    def finish(self, params: Mapping[str, torch.Tensor]) -> None:
        pass

    def report(self) -> dict:
        return {}


#: attributes the registry requires per kind
REQUIRED = {
    "quantizer": ("name", "Config", "needs", "quantize"),
    "format": ("name", "version", "Config", "pack", "unpack", "dequantize_fields", "expected_bits"),
    "planner": ("name", "Config", "plan"),
    "refiner": ("name", "Config", "scope"),
    "backend": ("name", "Config"),
    "regularizer": ("name", "Config", "penalty"),
}
