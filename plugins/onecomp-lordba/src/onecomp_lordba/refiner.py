"""Refiner ``lordba``: unmerged low-rank adapters trained on a frozen (quantized) base.

Every chosen linear layer gets an adapter of rank r, ``y = base(x) + Δy``, in format ``lordba``
(``kind = "binary"``) or ``lora`` (``kind = "fp16"``, the comparison). The adapter's fields are opened
with :mod:`onecomp.training`: sign fields become float latents with a straight-through sign, scales
(or fp16 factors) float parameters rounded to fp16 in the forward pass. The objective is the mean
token KL(fp ‖ adapted) on calibration windows (recovery), or, with ``data = "file.txt"``, the
next-token loss on that text (task fine-tuning). ``Trainer.fit`` keeps the best state seen.

Factors start from the rank-r truncated SVD of ``W_fp − Ŵ`` (``init = "residual"``: the adapter starts
as the best rank-r correction of the quantization error, binarized for lordba) or at random.
"""

from __future__ import annotations

import math
import time

import attrs
import torch
from tqdm.auto import tqdm

from onecomp import ConfigError, Refiner, in_range, matches, one_of, stored_bits
from onecomp.checkpoint import QuantLinear
from onecomp.checkpoint.adapters import Adapter, attach, attached, detach, save_adapters
from onecomp.training import TrainableLinear, TrainConfig, Trainer, first_windows, freeze

FORMAT_OF = {"binary": "lordba", "fp16": "lora"}


def _tokens(inst, attribute, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ConfigError(attribute.name, f"must be an integer of at least 2 tokens, got {value!r}")


@attrs.define
class LoRDBAConfig(TrainConfig):
    #: "binary": format lordba (signs + fp16 channel scales); "fp16": format lora (fp16 factors)
    kind: str = attrs.field(default="binary", validator=one_of("binary", "fp16"))
    rank: int = attrs.field(default=16, validator=in_range(1, 1 << 16))  # r
    #: layers that get an adapter: name suffixes or "re:<regex>"; empty: every linear layer of the blocks
    layers: list = attrs.Factory(list)
    #: "residual": factors from the rank-r SVD of W_fp − Ŵ (needs the fp teacher); "random": Gaussian
    init: str = attrs.field(default="residual", validator=one_of("residual", "random"))
    #: a text file to fine-tune on (next-token loss); empty: distil the fp model on the calibration windows
    data: str = ""
    #: tokenizer directory for ``data``; empty: the model's own directory
    tokenizer: str = ""
    #: tokens per training window cut from ``data``
    seq_len: int = attrs.field(default=512, validator=_tokens)
    epochs: int = attrs.field(default=2, validator=in_range(1, 10_000))
    lr: float = attrs.field(default=5e-3, validator=in_range(0, 1))
    lr_discrete: float = attrs.field(default=5e-3, validator=in_range(0, 1))


class AdapterTraining(TrainableLinear):
    """An adapter opened for training: the engine's TrainableLinear, run as ``Δy = B(A x)``."""

    def forward(self, x):
        return self.format.delta(self.fields(), x)

    def commit_adapter(self) -> Adapter:
        closed = self.commit()
        return Adapter(closed.format, closed.shape, closed.stored())


def chosen_layers(model, inspection, patterns) -> list[str]:
    names = inspection.linear_names()
    return [n for n in names if matches(n, patterns)] if patterns else names


def start_factors(W_fp: torch.Tensor | None, W_hat: torch.Tensor, rank: int, init: str, generator):
    """``(A [r, in], B [out, r])``: the truncated SVD of the residual split as √Σ on both sides, or random
    with ``‖B A‖`` about 1% of ``‖Ŵ‖``."""
    n, m = W_hat.shape
    if init == "residual":
        U, S, Vh = torch.linalg.svd((W_fp - W_hat).double(), full_matrices=False)
        k = min(rank, S.numel())
        root = S[:k].sqrt()
        A, B = torch.zeros(rank, m, dtype=torch.float64), torch.zeros(n, rank, dtype=torch.float64)
        A[:k], B[:, :k] = root[:, None] * Vh[:k], U[:, :k] * root
        return A.float(), B.float()
    A = torch.randn(rank, m, generator=generator) / math.sqrt(m)
    B = torch.randn(n, rank, generator=generator) / math.sqrt(rank)
    target = 0.01 * W_hat.norm() / max(float((B @ A).norm()), 1e-12)
    return A * target.sqrt(), B * target.sqrt()


def open_adapters(model, teacher, names, fmt, cfg, seed: int) -> dict[str, AdapterTraining]:
    """Attach one trainable adapter per layer in ``names``; sign latents start at the fp factors."""
    opened = {}
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        base = model.get_submodule(name)
        W_hat = base.weight.detach().float()
        W_fp = teacher.get_submodule(name).weight.detach().float() if teacher is not None else None
        if cfg.init == "residual" and W_fp is None:
            raise ConfigError("init", "'residual' needs the fp model; use init = \"random\"")
        A, B = start_factors(W_fp, W_hat, cfg.rank, cfg.init, gen)
        shape = tuple(W_hat.shape)
        holder = QuantLinear(fmt, shape, fmt.pack(fmt.from_factors(A, B), shape))
        layer = AdapterTraining(holder, cfg.discrete)
        with torch.no_grad():
            for k, latent in (("S_A", A), ("S_B", B)):
                if k in layer.params:  # latent fp factors; sign(latent) is the packed sign
                    layer.params[k].copy_(torch.where(latent == 0, torch.full_like(latent, 1e-8), latent))
        attach(model, name, layer)
        opened[name] = layer
    return opened


def text_windows(cfg: LoRDBAConfig, model, seed: int) -> torch.Tensor:
    """Training windows cut from ``cfg.data`` with the model's tokenizer: ``samples`` (0: 16) windows at
    seeded offsets, or the whole text in consecutive windows when it is shorter than that."""
    from transformers import AutoTokenizer

    from onecomp.calibration import leading_windows, load_text, sample_windows, tokenize

    source = cfg.tokenizer or getattr(model.config, "_name_or_path", "")
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ConfigError("tokenizer", f"cannot load a tokenizer from {source!r} ({exc}); set tokenizer = "
                                       "\"<directory>\"") from None
    ids = tokenize(tok, load_text(cfg.data))
    n = cfg.samples or 16
    if ids.numel() <= n * cfg.seq_len:
        return leading_windows(ids, n, cfg.seq_len)
    return sample_windows(ids, n, cfg.seq_len, seed)


def adapter_bytes(adapters) -> int:
    return sum(stored_bits(a.stored()) for a in adapters.values()) // 8


class LoRDBA(Refiner):
    """Trains unmerged adapters (binary LoRDBA or fp16 LoRA) on the frozen model, after the pivot."""

    name = "lordba"
    Config = LoRDBAConfig
    scope = "model"

    def refine_model(self, ctx) -> dict:
        cfg = self.config
        model, teacher = ctx.model, ctx.teacher
        model.eval()
        freeze(model)
        if teacher is not None:
            teacher.eval()
            freeze(teacher)
        names = chosen_layers(model, ctx.inspection, cfg.layers)
        if not names:
            raise ConfigError("layers", f"{cfg.layers} selects no linear layer of the model")
        fmt = ctx.registry.get("format", FORMAT_OF[cfg.kind]).from_dict({"rank": cfg.rank})
        t0 = time.perf_counter()
        if cfg.data:
            windows = text_windows(cfg, model, ctx.seed)
            objective_name = f"mean next-token loss on {cfg.data}"

            def batch_loss(ids):
                return model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            if teacher is None:
                raise ConfigError("data", "distillation needs the fp model; give a text file to fine-tune on")
            windows = first_windows(ctx.windows, cfg.samples)
            objective_name = "mean token KL(fp ‖ adapted)"

            def batch_loss(ids):
                with torch.no_grad():
                    p_log = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
                q_log = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
                return (p_log.exp() * (p_log - q_log)).sum(-1).mean()

        batches = list(windows.split(cfg.batch_size))

        def objective() -> float:
            with torch.no_grad():
                return sum(float(batch_loss(ids)) for ids in batches) / len(batches)

        previous = detach(model, names)  # adapters already there (an earlier stage) are replaced
        pivot = objective()
        opened = open_adapters(model, teacher, names, fmt, cfg, ctx.seed)
        trainer = Trainer(opened, "", cfg, ctx.regularizers)
        bar = tqdm(total=cfg.epochs * len(batches), desc=f"lordba ({cfg.kind})", unit="batch",
                   disable=not ctx.progress)

        def loss(i):
            bar.update(1)
            return batch_loss(batches[i])

        def on_epoch(epoch, start, value, best):
            bar.set_postfix_str(f"epoch {epoch} {start:.4f} → {value:.4f} (best {best:.4f})")

        row = trainer.fit(loss, len(batches), cfg.epochs, objective, ctx.seed, on_epoch)
        bar.close()
        adapters = {n: layer.commit_adapter() for n, layer in opened.items()}
        for n, a in adapters.items():
            attach(model, n, a)
        lora = ctx.registry.get("format", "lora").from_dict({"rank": cfg.rank})
        lora_bytes = sum(lora.expected_bits(a.shape) for a in adapters.values()) // 8
        info = {"kind": cfg.kind, "format": fmt.name, "rank": cfg.rank, "objective": objective_name}
        save_adapters(adapters, ctx.work_dir / "adapters", ctx.registry,
                      base_model=str(getattr(model.config, "_name_or_path", "")), info=info)
        return {**info, "layers": len(adapters), "replaced": len(previous), "loss_pivot": pivot, **row,
                "adapter_bytes": adapter_bytes(adapters), "fp16_lora_bytes": lora_bytes,
                "attached": len(attached(model)), "windows": int(windows.shape[0]),
                "tokens_per_window": int(windows.shape[1]), "seconds": time.perf_counter() - t0,
                "regularizers": {reg.name: reg.report() for reg in ctx.regularizers}}
