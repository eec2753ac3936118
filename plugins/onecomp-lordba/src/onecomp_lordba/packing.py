"""Signs packed eight to a byte: element ``8j + b`` of a row is bit ``b`` of byte ``j`` (1 for +1)."""

from __future__ import annotations

import torch

_BITS = torch.arange(8, dtype=torch.int32)
#: byte value -> its 8 signs as ±1, so unpacking is one gather
_TABLE = (((torch.arange(256, dtype=torch.int32)[:, None] >> _BITS) & 1) * 2 - 1).to(torch.int8)


def pack_signs(S: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` of ±1 → ``[..., ceil(k/8)]`` uint8; the padding bits of the last byte are zero."""
    k = S.shape[-1]
    bits = torch.nn.functional.pad((S > 0).to(torch.int32), (0, (-k) % 8))
    return (bits.reshape(*S.shape[:-1], -1, 8) << _BITS).sum(-1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, k: int, dtype=torch.int8) -> torch.Tensor:
    """Inverse of pack_signs: ``[..., ceil(k/8)]`` uint8 → ``[..., k]`` of ±1 in ``dtype``."""
    signs = _TABLE.to(device=packed.device, dtype=dtype)[packed.long()]  # [..., ceil(k/8), 8]
    return signs.reshape(*packed.shape[:-1], -1)[..., :k]
