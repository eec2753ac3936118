"""``onecomp inspect MODEL --plan CONFIG`` prints AutoBit's plan, bytes and budget without quantizing."""

import json

import pytest

pytest.importorskip("onecomp_gptq")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A seeded 2-block random Llama over the SmolLM2 vocabulary, with its tokenizer."""
    from onecomp.models import load_model
    from onecomp.testing.models import make_tiny_llama

    tokenizer = load_model("smollm2-135m").tokenizer
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    make_tiny_llama(seed=0, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_inspect_plan(tiny_dir, tmp_path, capsys):
    from onecomp.cli import main

    config = tmp_path / "plan.toml"
    config.write_text('[plan]\nplanner = "autobit"\ncost = "rtn"\ntarget_bpw = 3.5\ncandidates = [\n'
                      + ",\n".join(f'{{ name = "rtn", bits = {b}, group_size = 32 }}' for b in (2, 3, 4, 8)) + "]\n")
    assert main(["inspect", str(tiny_dir), "--plan", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["planned_bits"] <= out["budget"]["budget_bits"] == int(3.5 * out["budget"]["weights"])
    assert out["planned_bits"] == out["budget"]["planned_bits"]
    assert len(out["layers"]) == 14 and sum(r["layers"] for r in out["by_quantizer"]) == 14
    assert main(["inspect", str(tiny_dir), "--plan", str(config)]) == 0
    text = capsys.readouterr().out
    assert "bits per weight" in text and "budget:" in text and "target_bpw = 3.5" in text


def test_run_reports_the_allocation(tiny_dir, tmp_path):
    """A whole run with autobit: the stored bits match the uniform budget and the layer-wise stage
    report carries the allocation table and its heatmap."""
    import onecomp

    w3 = {"name": "gptq", "bits": 3, "group_size": 32, "mse": False}
    result = onecomp.run({"model": {"id": str(tiny_dir)}, "calibration": {"samples": 8, "seq_len": 64},
                          "plan": {"planner": "autobit", "quantizer": w3,
                                   "candidates": [{**w3, "bits": b} for b in (2, 4, 8)]},
                          "evaluation": {"windows": 2, "seq_len": 64, "before": False},
                          "output": {"dir": str(tmp_path / "run")}}, progress=False)
    reports = tmp_path / "run" / "reports"
    assert "## Bit allocation (autobit)" in (reports / "01-layerwise.md").read_text()
    assert (reports / "01-layerwise-allocation.png").exists()
    bits = result["stages"][0]["bits"]
    reg = onecomp.Registry.default()
    q = reg.create(reg.resolve("quantizer", w3))
    from onecomp.checkpoint import load

    model = load(tmp_path / "run" / "01-layerwise", reg)
    budget = sum(q.format_for((m.out_features, m.in_features)).expected_bits((m.out_features, m.in_features))
                 for n, m in model.named_modules() if hasattr(m, "stored"))
    assert bits["quantized_bits"] <= budget
