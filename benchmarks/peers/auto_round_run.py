"""auto-round (SignRound: sign-gradient tuning of rounding and min-max), run in its own venv on CPU.

Calibration goes in as a list of ``[1, seq_len]`` token tensors (our windows, in order): auto-round then
skips its dataset loading and tokenisation (no BOS is added to a tensor). auto-round itself masks the
last token of every window out of its attention mask and its loss (its workaround, left as is).
Defaults of the release otherwise (``iters`` and ``lr`` from the setting when given: 200 and 1/iters by default), symmetric int, the given
group size; output saved with ``save_quantized(format="auto_gptq")`` (packed int32 codes, fp16 scales,
packed zeros, g_idx) whose tensors give the bits per weight. ppl: the in-memory model after
``quantize()``, whose linear weights auto-round has replaced with the quantized-dequantized values.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import dequantize_gptq_into, load_fp32, start, stored_bits  # noqa: E402


def main():
    started = start("auto-round", __doc__, ["auto-round"])
    if started is None:
        return
    run, calib, evals = started
    args, s = run.args, run.args.setting
    model = run.fp_model()
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = [w[None] for w in calib]
    kw = {"bits": s["bits"], "group_size": s["group_size"], "sym": s.get("sym", True), "dataset": data,
          "nsamples": calib.shape[0], "seqlen": calib.shape[1], "device_map": "cpu", "amp": False,
          "enable_torch_compile": False}
    for name in ("iters", "lr"):
        if name in s:
            kw[name] = s[name]
    ar = AutoRound(model, tokenizer, **kw)
    run.timed(ar.quantize)
    out = Path(args.out) / "quantized"
    ar.save_quantized(str(out), format="auto_gptq", inplace=False)
    bits = stored_bits(out, args.model)
    # evaluate the saved checkpoint's dequantized weights on the fp32 model (independent of auto-round's
    # in-memory state): unpack the auto_gptq tensors ourselves
    model = load_fp32(args.model)
    unpacked = dequantize_gptq_into(model, out, s["bits"])
    run.evaluate(model, evals)
    run.finish(bits=bits, unpacked=unpacked, tool_params={k: (v if not isinstance(v, list) else "our windows")
                                       for k, v in kw.items()} | {"iters": getattr(ar, "iters", None)},
               eval_weights="fp32 model with weights unpacked from the saved auto_gptq tensors "
               "(qweight/qzeros/scales/g_idx)")


if __name__ == "__main__":
    main()
