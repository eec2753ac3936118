"""HQQ (half-quadratic quantization, calibration-free), run in its own venv.

``AutoHQQHFModel.quantize_model`` with ``BaseQuantizeConfig(nbits, group_size)`` on every decoder linear
(lm_head and embeddings stay fp), scales and zero points in fp16 (HQQ's default compute dtype); the
calibration windows are not used (HQQ needs none). HQQ groups ``group_size`` consecutive weights of the
flattened matrix: with group 128 on the 576-wide layers a group can span two rows (576 = 4.5 × 128),
unlike the protocol's groups (docs/protocol.md); group 64 keeps groups inside rows. HQQ's own save format is a torch pickle,
so the runner stores the tensors of every HQQLinear state dict (W_q, scale, zero, ...) in a safetensors
file and counts those. ppl: each HQQLinear replaced by an fp32 nn.Linear holding its dequantized weight.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from peer_common import start, stored_bits  # noqa: E402


def main():
    started = start("hqq", __doc__, ["hqq"])
    if started is None:
        return
    run, calib, evals = started
    args, s = run.args, run.args.setting
    model = run.fp_model()
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel
    from safetensors.torch import save_file

    config = BaseQuantizeConfig(nbits=s["bits"], group_size=s["group_size"])
    run.timed(lambda: AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=torch.float16,
                                                    device="cpu"))
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, HQQLinear)}
    tensors = {}
    for name, m in quantized.items():
        for k, v in m.state_dict().items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}.{k}"] = v.detach().contiguous().cpu()
    out = Path(args.out) / "quantized"
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "hqq_linears.safetensors"))
    bits = stored_bits(out, args.model)
    for name, m in quantized.items():
        W = m.dequantize().float().reshape(m.meta["shape"])
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=m.bias is not None)
        lin.weight.data = W
        if m.bias is not None:
            lin.bias.data = m.bias.float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)
    model.float()
    run.evaluate(model, evals)
    run.finish(bits=bits, tool_params={"quant_config": {k: str(v) for k, v in config.items()},
                                       "quantized_layers": len(quantized)},
               eval_weights="fp32 nn.Linear with each HQQLinear's dequantize()")


if __name__ == "__main__":
    main()
