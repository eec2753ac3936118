"""Backend ``triton``: fused Triton kernels for the ``gptq`` and ``mdbf`` formats on CUDA.

``kernel()`` returns a module running the Triton kernel when triton is importable and either a
CUDA device is present or interpreter mode is on (``interpret = true`` or ``TRITON_INTERPRET=1``);
otherwise, and for any other format or params, it declines (None) and the layer takes the next
backend or the format's reference path. Nothing here imports triton: ``kernels`` is imported on
the first launch.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping

import attrs
import torch

import onecomp
from onecomp import Backend, ConfigError

from .reference import reference_linear

#: format name -> bit widths the kernels read natively (mdbf: the packed sign bits)
NATIVE = {"gptq": (1, 2, 3, 4, 5, 6, 7, 8), "mdbf": (1,)}
GPTQ_STORED = ("qweight", "qzeros", "scales")
MDBF_STORED = ("S_A_bits", "S_B_bits", "A", "Q_U", "Q_V", "B")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _block(inst, attribute, value):
    """attrs validator: a power of two, at least 16 (``tl.dot`` tiles)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ConfigError(attribute.name, f"must be a power of two >= 16, got {value!r}")


@attrs.define
class TritonConfig:
    interpret: bool = False  # run the kernels in Triton's interpreter, on any device (tests; slow)
    block_m: int = attrs.field(default=16, validator=_block)  # rows of x per program
    block_n: int = attrs.field(default=64, validator=_block)  # output channels per program
    block_k: int = attrs.field(default=64, validator=_block)  # input channels per loop step


@attrs.frozen
class _Capabilities:
    """Stand-in for ``onecomp.BackendCapabilities`` on a core that does not have it yet."""

    name: str
    device: str
    free_memory: int | None = None
    total_memory: int | None = None
    formats: Mapping[str, tuple[int, ...]] = attrs.Factory(dict)
    notes: str = ""

    def to_dict(self) -> dict:
        return {**attrs.asdict(self), "formats": {k: list(v) for k, v in self.formats.items()}}


def _capabilities_class():
    try:
        return onecomp.BackendCapabilities
    except AttributeError:
        return _Capabilities


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class TritonLinear(torch.nn.Module):
    """``x @ Ŵᵀ + bias`` from one weight's stored tensors (buffers, so ``.to()`` moves them).

    Runs the Triton kernel when it can take ``x`` (on CUDA or in interpreter mode, a float dtype,
    no autograd); otherwise the reference path, dequantize then matmul."""

    def __init__(self, fmt, stored: Mapping[str, torch.Tensor], shape, bias, config: TritonConfig, interpret: bool):
        super().__init__()
        self.fmt, self.shape, self.config, self.interpret = fmt, tuple(shape), config, interpret
        self._names = tuple(stored)
        for k, v in stored.items():
            self.register_buffer(k, v, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def stored(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._names}

    def extra_repr(self) -> str:
        return f"format={self.fmt.name}, params={self.fmt.to_dict()}, shape={self.shape}, interpret={self.interpret}"

    def runs_kernel(self, x: torch.Tensor) -> bool:
        if x.dtype not in DTYPES or (torch.is_grad_enabled() and x.requires_grad):
            return False
        if self.interpret:
            return x.dtype != torch.bfloat16  # numpy, under the interpreter, has no bfloat16
        return x.is_cuda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_kernel(x):
            return reference_linear(self.fmt, self.stored(), self.shape, x, self.bias)
        out, inp = self.shape
        y = self.run(x.reshape(-1, inp))
        return y.reshape(*x.shape[:-1], out)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> dict:
        c = self.config
        return dict(interpret=self.interpret, block_m=c.block_m, block_n=c.block_n, block_k=c.block_k)


class TritonGPTQLinear(TritonLinear):
    def run(self, x):
        from .kernels import gptq_matmul

        p = self.fmt.to_dict()
        group = self.shape[1] if p["group_size"] == -1 else p["group_size"]
        s = self.stored()
        return gptq_matmul(x, s["qweight"], s["qzeros"], s["scales"], s.get("g_idx"), self.bias,
                           bits=p["bits"], group_size=group, **self.blocks())


class TritonMDBFLinear(TritonLinear):
    def run(self, x):
        from .kernels import mdbf_matmul

        return mdbf_matmul(x, self.stored(), self.bias, **self.blocks())


class TritonBackend(Backend):
    """Fused dequantize-matmul kernels in Triton; CUDA, or Triton's interpreter for tests."""

    name = "triton"
    Config = TritonConfig

    @property
    def interpret(self) -> bool:
        return self.config.interpret or os.environ.get("TRITON_INTERPRET", "0") == "1"

    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def active(self) -> bool:
        """Whether ``kernel()`` takes any layer here."""
        return triton_available() and (self.interpret or torch.cuda.is_available())

    def capabilities(self):
        dev = self.device()
        free = total = None
        if dev.type == "cuda":
            free, total = torch.cuda.mem_get_info()
        if not triton_available():
            notes = "triton is not installed: every layer is declined"
        elif dev.type == "cuda":
            notes = "fused Triton kernels on CUDA" + (" (interpreter mode)" if self.interpret else "")
        elif self.interpret:
            notes = "Triton interpreter on CPU: correct but slow, for tests"
        else:
            notes = "no CUDA device: every layer is declined (interpret = true runs the interpreter)"
        fields = dict(name=self.name, device=str(dev), free_memory=free, total_memory=total,
                      formats=dict(NATIVE) if self.active() else {}, notes=notes)
        cls = _capabilities_class()
        accepted = attrs.fields_dict(cls) if attrs.has(cls) else fields
        return cls(**{k: v for k, v in fields.items() if k in accepted})

    def kernel(self, fmt, stored: Mapping[str, torch.Tensor], shape, bias=None) -> torch.nn.Module | None:
        if not self.active() or fmt.name not in NATIVE:
            return None
        if fmt.name == "gptq":
            p = fmt.to_dict()
            if p.get("bits") not in NATIVE["gptq"] or set(p) - {"bits", "group_size", "act_order"}:
                return None
            needed, cls = GPTQ_STORED + (("g_idx",) if p.get("act_order") else ()), TritonGPTQLinear
        else:
            needed, cls = MDBF_STORED, TritonMDBFLinear
        if set(stored) != set(needed):
            return None
        stored = dict(stored)
        if not self.interpret:
            dev = self.device()
            stored = {k: v.to(dev) for k, v in stored.items()}
            bias = None if bias is None else bias.to(dev)
        return cls(fmt, stored, shape, bias, self.config, self.interpret)
