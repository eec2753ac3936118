"""Quantizer ``mdbf``: DBF (``envelope_rank = 1, terms = 1``) and multi-envelope DBF, emitting format ``mdbf``."""

from __future__ import annotations

import logging
import time

import attrs
import torch

from onecomp import Compressed, LayerTask, Quantizer, in_range

from .factorize import bits_per_weight, estimated_flops, fit, importance_scales, rank_for
from .format import MDBFFormat, MDBFParams

log = logging.getLogger(__name__)

#: fits estimated above this many multiply-adds (several seconds on 2 cores) get a progress bar
PROGRESS_FLOPS = 1e11


@attrs.define
class MDBFConfig:
    #: bits per weight to stay within, by the format's formula; picks the middle rank r
    target_bpw: float = attrs.field(default=1.0, validator=in_range(0, 64, lo_open=True))
    envelope_rank: int = attrs.field(default=1, validator=in_range(1, 64))  # l
    terms: int = attrs.field(default=2, validator=in_range(1, 16))  # P
    #: outer ADMM rounds per term; 15 keeps SmolLM2-135M within ~10 min on 2 cores (README, "Cost")
    iterations: int = attrs.field(default=15, validator=in_range(0, 100_000))
    inner: int = attrs.field(default=3, validator=in_range(1, 100))  # ADMM iterations per side and round
    reg: float = attrs.field(default=0.03, validator=in_range(0, None))  # ridge, relative to diag(XᵀX)
    importance: bool = True  # weight input columns by sqrt(E[x²]) from calibration
    seed: int = attrs.field(default=0, validator=in_range(0, 2**31 - 1))
    #: torch intra-op threads during the fit (0 keeps the process setting): its ops are small, and on
    #: shared cores two threads were 2–5× slower than one (README, "Cost")
    threads: int = attrs.field(default=1, validator=in_range(0, 1024))


class MDBF(Quantizer):
    """Fits ``W ≈ Σ_p (S_A ⊙ A Q_Uᵀ)(S_B ⊙ Q_V Bᵀ)`` with the largest middle rank r that meets
    ``target_bpw``; with ``importance`` the fit weights input columns by ``sqrt(E[x²])``."""

    name = "mdbf"
    Config = MDBFConfig
    needs = frozenset({"diag"})

    def rank(self, shape: tuple[int, int]) -> int:
        c = self.config
        return rank_for(shape[0], shape[1], c.envelope_rank, c.terms, c.target_bpw)

    def format_for(self, shape) -> MDBFFormat:
        c = self.config
        r = self.rank(shape)
        if r < 1:
            raise ValueError(f"mdbf: target_bpw {c.target_bpw} is too low for a {shape[0]}×{shape[1]} weight")
        return MDBFFormat(MDBFParams(rank=r, envelope_rank=c.envelope_rank, terms=c.terms))

    def quantize(self, task: LayerTask) -> Compressed:
        c = self.config
        W = task.W.detach().float()
        if not torch.isfinite(W).all():
            raise ValueError(f"{task.name}: the weight has non-finite values")
        n, m = W.shape
        l, P = c.envelope_rank, c.terms
        r = self.rank((n, m))
        if r < 1:
            raise ValueError(f"{task.name}: target_bpw {c.target_bpw} is too low for a {n}×{m} weight with "
                             f"terms={P}, envelope_rank={l}: rank 1 already costs "
                             f"{bits_per_weight(n, m, 1, l, P):.3f} bits per weight")
        diag = task.stats.diag if (c.importance and task.stats is not None) else None
        scales = importance_scales(diag, m)
        bar = None
        if estimated_flops(n, m, r, l, P, c.iterations, c.inner) > PROGRESS_FLOPS:
            from tqdm.auto import tqdm

            bar = tqdm(total=P * c.iterations, desc=f"mdbf {task.name}", unit="round", leave=False)
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        try:
            if c.threads:
                torch.set_num_threads(c.threads)
            terms, report = fit(W, r, l, P, c.iterations, c.inner, c.reg, scales, c.seed + task.seed, bar=bar)
        finally:
            torch.set_num_threads(threads)
            if bar is not None:
                bar.close()
        params = MDBFParams(rank=r, envelope_rank=l, terms=P)
        fields = {"S_A": torch.stack([t.S_A for t in terms]).to(torch.int8),
                  "S_B": torch.stack([t.S_B for t in terms]).to(torch.int8),
                  **{k: torch.stack([getattr(t, k) for t in terms]) for k in ("A", "Q_U", "Q_V", "B")}}
        fmt = MDBFFormat(params)
        stored = fmt.pack(fields, (n, m))
        seconds = time.perf_counter() - t0
        log.info("%s: mdbf r=%d l=%d P=%d weighted rel err %.4f in %.1fs", task.name, r, l, P,
                 report["rel_err"][-1], seconds)
        info = {"rank": r, "loss": report["rel_err"][-1], "init_loss": report["init_rel_err"][0],
                "term_loss": report["rel_err"], "seconds": seconds}
        return Compressed(fmt, stored, (n, m), info)
