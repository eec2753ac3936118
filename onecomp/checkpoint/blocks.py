"""Per-block progress of a running stage on disk, so that a crash loses at most one block.

``block-NNN.safetensors`` holds the stored tensors of the block's QuantLinears and
``block-NNN.json`` their formats plus the stage's own notes; both are written atomically,
the JSON last, so a block counts as done only when both are complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..components import replace_module
from ..errors import RunError, UnknownComponent
from .quantlinear import QuantLinear


class BlockStore:
    """Finished blocks of one stage under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, b: int):
        return self.root / f"block-{b:03d}.safetensors", self.root / f"block-{b:03d}.json"

    def has(self, b: int) -> bool:
        return self._paths(b)[1].exists()

    def save(self, b: int, modules: dict[str, QuantLinear], notes: dict) -> None:
        st, js = self._paths(b)
        tensors = {f"{name}::{k}": v.detach().contiguous() for name, m in modules.items()
                   for k, v in m.stored().items()}
        tmp = st.with_name(st.name + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, st)
        meta = {name: {"format": m.format.name, "params": m.format.to_dict(), "shape": list(m.shape)}
                for name, m in modules.items()}
        tmp = js.with_name(js.name + ".tmp")
        tmp.write_text(json.dumps({"modules": meta, "notes": notes}, default=str))
        os.replace(tmp, js)

    def load(self, b: int, registry) -> tuple[dict, dict]:
        """``({name: (format, shape, stored)}, notes)`` of a saved block; a corrupted block is a RunError
        that says how to recompute it."""
        st, js = self._paths(b)
        try:
            meta = json.loads(js.read_text())
            tensors = load_file(st)
            out = {}
            for name, m in meta["modules"].items():
                fmt = registry.get("format", m["format"]).from_dict(m["params"])
                stored = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
                fmt.check(stored, tuple(m["shape"]))
                out[name] = (fmt, tuple(m["shape"]), stored)
            return out, meta["notes"]
        except UnknownComponent:
            raise
        except Exception as exc:
            raise RunError(f"{js.parent}: the work files of block {b} are corrupted ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]}); delete {st.name} and {js.name} and rerun with "
                           "--resume to recompute that block (or --force to start over)") from None

    def apply(self, b: int, model, registry) -> dict:
        """Put a saved block's QuantLinears into ``model`` (keeping each layer's bias); its notes."""
        saved, notes = self.load(b, registry)
        for name, (fmt, shape, stored) in saved.items():
            old = model.get_submodule(name)
            replace_module(model, name, QuantLinear(fmt, shape, stored, getattr(old, "bias", None)))
        return notes
