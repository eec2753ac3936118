"""The original authors' onecomp release (PyPI ``onecomp``), run in its own venv on our protocol inputs.

Its calibration loader (text source -> chunks) is replaced by one returning our token windows as they
are (``input_ids`` and an all-ones ``attention_mask``), in every module that imported it, so it sees
exactly the calibration tokens the other tools see: no re-tokenisation, no BOS, no re-sampling.
Quantization is ``Runner.run()`` (GPTQ, or QEP+GPTQ with ``qep=True``); the saved output is
``Runner.save_quantized_model`` (its GPTQ packed safetensors); ppl is measured on the fp32 model with
the weights replaced by the release's own dequantization (``Runner.update_model_weights``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from peer_common import start, stored_bits  # noqa: E402

#: modules of the release that call prepare_calibration_dataset under their own name
LOADER_USERS = ["onecomp.runner", "onecomp.qep._quantize_with_qep", "onecomp.qep._quantize_with_qep_arch",
                "onecomp.runner_methods.chunked_quantization"]


def use_our_windows(calib: torch.Tensor) -> None:
    def prepare_calibration_dataset(tokenizer=None, device=None, calibration_config=None, model=None, logger=None,
                                    **_):
        dev = device if device is not None else torch.device("cpu")
        return {"input_ids": calib.to(dev), "attention_mask": torch.ones_like(calib).to(dev)}

    for name in LOADER_USERS:
        mod = importlib.import_module(name)
        assert hasattr(mod, "prepare_calibration_dataset"), name
        mod.prepare_calibration_dataset = prepare_calibration_dataset


def main():
    started = start("onecomp-orig", __doc__, ["onecomp"])
    if started is None:
        return
    run, calib, evals = started
    args, s = run.args, run.args.setting
    import onecomp
    from onecomp import CalibrationConfig, ModelConfig, QEPConfig, Runner
    from onecomp.quantizer.gptq import GPTQ

    assert Path(onecomp.__file__).resolve().parts[-3:-1] != ("main", "onecomp"), "imported our onecomp"
    use_our_windows(calib)
    kw = {"wbits": s["bits"], "groupsize": s["group_size"]}
    if "act_order" in s:
        kw["actorder"] = s["act_order"]
    if "sym" in s:
        kw["sym"] = s["sym"]
    quantizer = GPTQ(**kw)
    runner = Runner(model_config=ModelConfig(path=args.model, dtype="float32", device="cpu"),
                    quantizer=quantizer,
                    calibration_config=CalibrationConfig(max_length=calib.shape[1],
                                                         num_calibration_samples=calib.shape[0]),
                    qep=bool(s.get("qep")), qep_config=QEPConfig() if s.get("qep") else None,
                    report_progress=False)
    run.timed(runner.run)
    out = Path(args.out) / "quantized"
    runner.save_quantized_model(str(out))
    bits = stored_bits(out, args.model)
    model = run.fp_model()
    runner.update_model_weights(model)
    run.evaluate(model, evals)
    params = {k: getattr(quantizer, k) for k in ("wbits", "groupsize", "actorder", "sym", "percdamp", "mse",
                                                 "blocksize")}
    if s.get("qep"):
        qc = runner.qep_config
        params["qep"] = {"general": qc.general, "percdamp": qc.percdamp, "perccorr": qc.perccorr,
                         "exclude_layer_keywords": qc.exclude_layer_keywords}
    run.finish(bits=bits, tool_params=params, eval_weights="fp32 model with weights from "
               "Runner.update_model_weights (the release's own dequantization of its results)")


if __name__ == "__main__":
    main()
