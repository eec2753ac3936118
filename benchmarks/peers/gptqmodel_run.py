"""GPTQModel (ModelCloud) GPTQ, run in its own venv on CPU (a pure-Python wheel: no CUDA build).

``GPTQModel.load(dir, QuantizeConfig(bits, group_size))`` then ``quantize`` with our windows as a list of
``{input_ids, attention_mask}`` dicts (batch 1, ``calibration_sort=None`` so the order is kept); the
tool adds no BOS to ready token ids. Its defaults otherwise (symmetric, its act-order and damping
defaults, recorded in the row). Output: ``save`` (GPTQ format: packed qweight, qzeros, fp16 scales,
g_idx), whose tensors give the bits per weight; ppl on the fp32 model with the weights unpacked by us
from those saved tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from peer_common import dequantize_gptq_into, load_fp32, start, stored_bits  # noqa: E402


def main():
    started = start("gptqmodel", __doc__, ["gptqmodel"])
    if started is None:
        return
    run, calib, evals = started
    args, s = run.args, run.args.setting
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=s["bits"], group_size=s["group_size"])
    model = GPTQModel.load(args.model, qcfg, device="cpu", dtype=torch.float32)
    data = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in calib]
    run.timed(lambda: model.quantize(data, batch_size=1, calibration_sort=None))
    out = Path(args.out) / "quantized"
    model.save(str(out))
    bits = stored_bits(out, args.model)
    fp = load_fp32(args.model)
    unpacked = dequantize_gptq_into(fp, out, s["bits"])
    run.evaluate(fp, evals)
    params = {k: str(getattr(qcfg, k, None)) for k in ("bits", "group_size", "sym", "desc_act", "damp_percent",
                                                         "act_group_aware", "true_sequential", "format")}
    run.finish(bits=bits, unpacked=unpacked, tool_params=params,
               eval_weights="fp32 model with weights unpacked by us from the saved GPTQ tensors")


if __name__ == "__main__":
    main()
