"""llmcompressor's GPTQModifier (W<bits>A16, symmetric int, group 128), run in its own venv on our inputs.

Calibration goes in as a ready torch DataLoader over our windows (batch 1, in order, ``input_ids`` +
all-ones ``attention_mask``): llmcompressor then skips its dataset loading, tokenisation, shuffling and
BOS handling. The 576-wide layers of the embedded model are not a multiple of 128; the modifier refuses
them unless ``bypass_divisibility_checks=True`` (setting ``bypass``), in which case the last group of a
row is shorter, as in docs/protocol.md. The model is saved with ``save_pretrained(save_compressed=True)``
(compressed-tensors ``pack-quantized``), whose tensors give the bits per weight; ppl is measured on that
saved checkpoint as ``onecomp.load`` reads it (OneComp's pack-quantized importer, in our own
interpreter: ``peer_common.evaluate_saved``), not on the in-memory fake-quant model.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from peer_common import start, stored_bits  # noqa: E402


def main():
    started = start("llmcompressor", __doc__, ["llmcompressor", "compressed-tensors"])
    if started is None:
        return
    run, calib, _ = started
    args, s = run.args, run.args.setting
    model = run.fp_model()
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in calib]
    loader = DataLoader(rows, batch_size=1, shuffle=False)
    kw = {}
    if s.get("bypass", True):
        kw["bypass_divisibility_checks"] = True
    if s["group_size"] == 128:
        kw["scheme"] = f"W{s['bits']}A16"  # the preset: int, symmetric, group 128
    else:
        kw["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": s["bits"], "type": "int", "symmetric": True, "strategy": "group",
            "group_size": s["group_size"]}}}
    recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], **kw)
    run.timed(lambda: oneshot(model=model, processor=tokenizer, dataset=loader, recipe=recipe,
                              num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1]))
    out = Path(args.out) / "quantized"
    model.save_pretrained(str(out), save_compressed=True)
    tokenizer.save_pretrained(str(out))
    bits = stored_bits(out, args.model)
    params = {k: str(getattr(recipe, k, None)) for k in ("block_size", "dampening_frac", "actorder")}
    params.update({k: str(v) for k, v in kw.items()})
    del model
    run.evaluate_saved(out)
    run.finish(bits=bits, tool_params=params, eval_weights="the saved pack-quantized checkpoint as onecomp.load "
               "reads it (OneComp's compressed-tensors importer)")


if __name__ == "__main__":
    main()
