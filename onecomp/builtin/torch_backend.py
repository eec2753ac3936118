"""Backend ``torch``: plain PyTorch on CPU, or CUDA when present."""

from __future__ import annotations

import attrs
import psutil
import torch

from ..components import Backend
from ..config import one_of
from ..hookspecs import hookimpl


@attrs.define
class TorchConfig:
    device: str = attrs.field(default="auto", validator=one_of("auto", "cpu", "cuda"))
    threads: int = 0  # 0 = leave torch's default


class TorchBackend(Backend):
    """Runs every format through its ``dequantize``/``linear`` reference in PyTorch."""

    name = "torch"
    Config = TorchConfig

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)

    def device(self):
        if self.config.device == "cuda" or (self.config.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    def memory_report(self):
        if self.device().type == "cuda":
            free, total = torch.cuda.mem_get_info()
            return {"device": "cuda", "total_bytes": total, "free_bytes": free}
        vm = psutil.virtual_memory()
        return {"device": "cpu", "total_bytes": vm.total, "free_bytes": vm.available, "threads": torch.get_num_threads()}


@hookimpl
def register_backends(register):
    register(TorchBackend)
