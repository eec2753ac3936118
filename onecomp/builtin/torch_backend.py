"""Backend ``torch``: plain PyTorch on CPU, or CUDA when present."""

from __future__ import annotations

import attrs
import psutil
import torch

from ..components import Backend, BackendCapabilities
from .cpu_kernels import cpu_kernel, int4_available
from ..validation import in_range, one_of
from ..hookspecs import hookimpl


@attrs.define
class TorchConfig:
    device: str = attrs.field(default="auto", validator=one_of("auto", "cpu", "cuda"))
    threads: int = attrs.field(default=0, validator=in_range(0, None))  # 0 = leave torch's default
    # glibc: CPU allocations of at least this many MiB get their own mapping, returned to the system
    # when freed; 0 leaves glibc's adaptive threshold (see docs/config.md, [backend])
    mmap_threshold_mb: int = attrs.field(default=1, validator=in_range(0, 32))


def set_mmap_threshold(mb: int) -> bool:
    """Fix glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``); False where there is no glibc.

    glibc raises the threshold adaptively to the size of the largest freed block (up to 32 MiB), so
    after the first batch the activation tensors come from the heap, whose freed space is kept and
    reused but not returned: the resident high-water mark grows block after block. The fixed threshold
    maps and unmaps each large tensor instead, which costs time, as every page is faulted in afresh.
    Measured figures (SmolLM2-135M, GPTQ 4-bit g128, the protocol) are in docs/config.md, [backend]."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(mb) << 20))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


class TorchBackend(Backend):
    """Plain PyTorch: ``gptq`` up to 4 bits through torch's packed int4 CPU kernel, other ``gptq``
    bit widths and ``mdbf`` from their packed tensors per call (see ``cpu_kernels``); other formats
    are declined to their reference path."""

    name = "torch"
    Config = TorchConfig

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        if self.config.mmap_threshold_mb and self.device().type == "cpu":
            set_mmap_threshold(self.config.mmap_threshold_mb)

    def device(self):
        if self.config.device == "cuda" or (self.config.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    def capabilities(self) -> BackendCapabilities:
        per_call = "gptq 5-8 bits dequantized per call in tiles of rows, mdbf as sign matmuls per call"
        if self.device().type == "cuda":
            free, total = torch.cuda.mem_get_info()
            return BackendCapabilities(self.name, "cuda", free, total, {}, None,
                                       f"no native kernels on CUDA (the onecomp-triton backend has them); {per_call}")
        vm = psutil.virtual_memory()
        native = {"gptq": (1, 2, 3, 4)} if int4_available() else {}
        notes = ("gptq 1-4 bits through torch's packed int4 CPU kernel (bf16 activations at its edge); "
                 if native else "this torch has no packed int4 CPU kernel; ") + per_call
        return BackendCapabilities(self.name, "cpu", vm.available, vm.total, native, torch.get_num_threads(), notes)

    def kernel(self, fmt, stored, shape, bias=None):
        return cpu_kernel(fmt, stored, shape, bias)


@hookimpl
def register_backends(register):
    register(TorchBackend)
