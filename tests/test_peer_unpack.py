"""The benchmark harness reads peers' GPTQ checkpoints itself: its int32 unpacking, checked against a reference packer."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks" / "peers"))
from peer_common import unpack_int32  # noqa: E402


def _pack_stream(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Columns of ``v [rows, cols]`` as one LSB-first bit stream of int32 words per column (GPTQ's qweight)."""
    words = torch.zeros((v.shape[0] * bits + 31) // 32, v.shape[1], dtype=torch.int64)
    for i in range(v.shape[0]):
        for b in range(bits):
            bit = i * bits + b
            words[bit // 32] |= ((v[i] >> b) & 1) << (bit % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_int32_inverts_the_gptq_packing_along_either_dim(bits):
    v = torch.randint(0, 2**bits, (64, 5), generator=torch.Generator().manual_seed(bits))
    packed = _pack_stream(v, bits)
    assert torch.equal(unpack_int32(packed, bits, 0).long(), v)
    assert torch.equal(unpack_int32(packed.T.contiguous(), bits, 1).long(), v.T)
