"""GPTQModel (ModelCloud) GPTQ, run in its own venv on CPU (a pure-Python wheel: no CUDA build).

``GPTQModel.load(dir, QuantizeConfig(bits, group_size))`` then ``quantize`` with our windows as a list of
``{input_ids, attention_mask}`` dicts (batch 1, ``calibration_sort=None`` so the order is kept); the
tool adds no BOS to ready token ids. Its defaults otherwise (symmetric, its act-order and damping
defaults, recorded in the row). Output: ``save`` (GPTQ format: packed qweight, qzeros, fp16 scales,
g_idx), whose tensors give the bits per weight; ppl of that saved checkpoint as ``onecomp.load`` reads
it (OneComp's GPTQ importer, in our own interpreter: ``peer_common.evaluate_saved``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from peer_common import start, stored_bits  # noqa: E402


def main():
    started = start("gptqmodel", __doc__, ["gptqmodel"])
    if started is None:
        return
    run, calib, _ = started
    args, s = run.args, run.args.setting
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=s["bits"], group_size=s["group_size"])
    model = GPTQModel.load(args.model, qcfg, device="cpu", dtype=torch.float32)
    data = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in calib]
    run.timed(lambda: model.quantize(data, batch_size=1, calibration_sort=None))
    out = Path(args.out) / "quantized"
    model.save(str(out))
    bits = stored_bits(out, args.model)
    del model
    run.evaluate_saved(out)
    params = {k: str(getattr(qcfg, k, None)) for k in ("bits", "group_size", "sym", "desc_act", "damp_percent",
                                                         "act_group_aware", "true_sequential", "format")}
    run.finish(bits=bits, tool_params=params,
               eval_weights="the saved GPTQ checkpoint as onecomp.load reads it (OneComp's GPTQ importer)")


if __name__ == "__main__":
    main()
