"""``onecomp inspect MODEL --plan CONFIG`` prints AutoBit's plan, bytes and budget without quantizing."""

import json

import pytest

pytest.importorskip("onecomp_gptq")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from onecomp.models import load_model
    from onecomp.testing.models import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    make_tiny_llama(seed=0).save_pretrained(path)
    load_model("smollm2-135m").tokenizer.save_pretrained(path)
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
