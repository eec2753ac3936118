"""auto-round (SignRound: sign-gradient tuning of rounding and min-max), run in its own venv on CPU.

Calibration goes in as a list of ``[1, seq_len]`` token tensors (our windows, in order): auto-round then
skips its dataset loading and tokenisation (no BOS is added to a tensor). auto-round itself masks the
last token of every window out of its attention mask and its loss (its workaround, left as is).
Defaults of the release otherwise (``iters`` and ``lr`` from the setting when given: 200 and 1/iters by default), symmetric int, the given
group size; output saved with ``save_quantized(format="auto_gptq")`` (packed int32 codes, fp16 scales,
packed zeros, g_idx) whose tensors give the bits per weight. ppl: that saved checkpoint as
``onecomp.load`` reads it (OneComp's GPTQ importer, in our own interpreter: ``peer_common.evaluate_saved``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import start, stored_bits  # noqa: E402


def main():
    started = start("auto-round", __doc__, ["auto-round"])
    if started is None:
        return
    run, calib, _ = started
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
    iters = getattr(ar, "iters", None)
    del ar, model
    # the saved checkpoint, independent of auto-round's in-memory state
    run.evaluate_saved(out)
    run.finish(bits=bits, tool_params={k: (v if not isinstance(v, list) else "our windows")
                                       for k, v in kw.items()} | {"iters": iters},
               eval_weights="the saved auto_gptq checkpoint as onecomp.load reads it (OneComp's GPTQ importer)")


if __name__ == "__main__":
    main()
