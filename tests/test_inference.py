"""Loading a checkpoint to run compressed: onecomp.load picks kernels, keeps no dequantized copies,
matches the reference path; ``onecomp generate``, ``inspect --backend`` and ``plugins`` report them."""

import json

import pytest
import torch

import onecomp
from onecomp.checkpoint import load as reference_load
from onecomp.checkpoint import quantized_modules, save_checkpoint
from onecomp.cli import main
from onecomp.kernels import kernel_summary
from onecomp.builtin.cpu_kernels import int4_available

pytestmark = pytest.mark.skipif(not int4_available(), reason="torch without the packed int4 CPU kernel")


@pytest.fixture(scope="module")
def gptq_checkpoint(tiny_model_dir, tmp_path_factory):
    """The tiny Llama quantized by RTN into the gptq format (4 bits, groups of 32), saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = onecomp.Registry.default()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    onecomp.compress(model, tokenizer, {"plan": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 32}}},
                     windows=torch.zeros(1, 8, dtype=torch.long), registry=registry)
    path = tmp_path_factory.mktemp("ckpt") / "rtn4"
    save_checkpoint(model, tokenizer, path, registry, base_model="tiny", config={}, stages=[])
    return path


def test_load_runs_every_module_through_a_kernel_without_dequantized_copies(gptq_checkpoint):
    model = onecomp.load(gptq_checkpoint)
    assert kernel_summary(model) == {"torch:gptq-int4pack": 14}
    ref = reference_load(gptq_checkpoint)
    assert set(kernel_summary(ref)) == {"reference"}
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, y_ref = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(y, y_ref, rtol=0.05, atol=0.05 * y_ref.abs().max().item())
    assert (y.argmax(-1) == y_ref.argmax(-1)).float().mean() > 0.9
    for m in quantized_modules(model).values():
        assert m._cache is None and m.owned_by_kernel  # the weight is held once, packed
    # the checkpoint's tensors come back exactly from the kernels
    saved = ref.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_reference_backend_and_cache_on_request(gptq_checkpoint):
    model = onecomp.load(gptq_checkpoint, backend=None)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert all(m._cache is None for m in quantized_modules(model).values())
    cached = onecomp.load(gptq_checkpoint, backend=None, cache_dequantized=True)
    with torch.no_grad():
        cached(input_ids=torch.tensor([[1, 2, 3]]))
    assert all(m._cache is not None for m in quantized_modules(cached).values())


def test_unknown_backend_is_a_config_error(gptq_checkpoint):
    with pytest.raises(onecomp.ConfigError, match="backend"):
        onecomp.load(gptq_checkpoint, backend="no-such-backend")


def test_generate_reports_speed_and_kernels(gptq_checkpoint, capsys):
    assert main(["generate", str(gptq_checkpoint), "Hello", "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] <= 5 and out["tokens_per_s"] > 0
    assert out["kernels"] == {"torch:gptq-int4pack": 14} and len(out["modules"]) == 14
    assert main(["generate", str(gptq_checkpoint), "Hello", "--max-new-tokens", "3", "--sample"]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "14 modules ran torch:gptq-int4pack" in text


def test_inspect_backend_and_plugins_show_capabilities(gptq_checkpoint, capsys):
    assert main(["inspect", str(gptq_checkpoint), "--backend", "torch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"]["capabilities"]["formats"] == {"gptq": [1, 2, 3, 4]}
    assert out["backend"]["kernels"] == {"torch:gptq-int4pack": 14}
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["components"]
    torch_row = next(r for r in rows if r["kind"] == "backend" and r["name"] == "torch")
    assert torch_row["capabilities"]["device"] == "cpu"
