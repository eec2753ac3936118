"""Our pipeline (``onecomp.run``) for one setting of benchmarks/quality.py, as a compare.py runner.

``onecomp.run`` draws its calibration and evaluation windows itself from the config; this runner first
checks that they are the very tensors in the shared inputs file the peers read. Time is the layer-wise
stage (which includes the calibration forward passes); ppl is the pipeline's own evaluation of the
quantized checkpoint model (evaluation batch 1, as the peer runners); bits per weight are counted from
the saved checkpoint with the same rule as for the peers.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import torch  # noqa: E402
from peer_common import Run, parse_args, stored_bits  # noqa: E402


def main():
    args = parse_args(__doc__)
    run = Run("ours", args, ["onecomp", "onecomp-gptq", "onecomp-qep"])
    calib, evals = run.inputs()
    import onecomp
    from onecomp.calibration import calibration_windows
    from onecomp.config import CorpusSpec
    from onecomp.evaluation import eval_windows
    from quality import SETTINGS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    n, seq_len = calib.shape
    windows = next(iter(evals.values())).shape[0]
    assert torch.equal(calibration_windows(tok, [CorpusSpec("kjv")], n, seq_len, 0), calib), "calibration differs"
    for text, w in evals.items():
        assert torch.equal(eval_windows(tok, text, windows, seq_len), w), f"evaluation windows of {text} differ"
    if args.setting.get("fp32"):
        from onecomp.models import load_model

        run.evaluate(load_model("smollm2-135m").model, evals)
        run.finish()
        return
    setting = SETTINGS[args.name]
    out = Path(args.out) / "run"
    config = {"model": {"id": "smollm2-135m"},
              "calibration": {"corpus": "kjv", "samples": n, "seq_len": seq_len, "seed": 0},
              "evaluation": {"texts": list(evals), "windows": windows, "seq_len": seq_len, "before": False,
                             "batch_size": 1},
              "plan": {"planner": "uniform", "quantizer": setting["quantizer"]},
              "refiners": setting.get("refiners", []), "output": {"dir": str(out)}}
    result = onecomp.run(config, progress=False, force=True)
    stage = result["stages"][0]
    run.row["quant_seconds"] = stage["seconds"]
    run.row["peak_rss_stage_mb"] = stage["peak_rss_mb"]
    run.row["ppl"] = stage["ppl"]
    bits = stored_bits(Path(stage["checkpoint"]), args.model)
    bits["onecomp_bits_per_weight"] = stage["bits"]["bits_per_weight"]
    run.finish(bits=bits, tool_params=config, eval_weights="onecomp.run's evaluation of the quantized model "
               "(QuantLinear dequantizes the stored codes)")


if __name__ == "__main__":
    main()
