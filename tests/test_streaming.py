"""The streamed layer-wise stage (``model.stream``): blocks read from the safetensors files one at a time,
released when saved, and the same checkpoint as the in-memory path, bit for bit."""

import pytest
import torch
from safetensors.torch import load_file

import onecomp
from onecomp.models import inspect_model, load_model
from onecomp.models.lazy import WeightFiles, inspect_streamed, load_params_, load_streamed, release_


def config(model_dir, out, stream, quantizer=None, refiners=()):
    return {"model": {"id": str(model_dir), "stream": stream},
            "calibration": {"corpus": "kjv", "samples": 4, "seq_len": 64, "batch_size": 2},
            "plan": {"planner": "uniform", "quantizer": quantizer or {"name": "gptq", "bits": 3, "group_size": 32}},
            "refiners": list(refiners),
            "evaluation": {"texts": ["kjv-gospels"], "windows": 2, "seq_len": 64, "before": False},
            "output": {"dir": str(out)}}


def checkpoint(out):
    return load_file(out / "01-layerwise" / "model.safetensors")


def assert_identical(a, b):
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture
def sharded_dir(tmp_path, tiny_llama):
    path = tmp_path / "sharded"
    tiny_llama.save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 1
    return path


def test_sharded_files_stream_into_the_same_model(sharded_dir, tiny_llama):
    model, files = load_streamed(sharded_dir, torch.float32, "cpu")
    blocks = model.model.layers
    assert all(p.is_meta for p in blocks.parameters())  # nothing of the blocks read yet
    assert not model.model.embed_tokens.weight.is_meta and not model.lm_head.weight.is_meta
    assert inspect_streamed(model, files, "cpu") == inspect_model(tiny_llama)
    assert all(p.is_meta for p in blocks.parameters())  # block 0, read for the inspection, released again
    for i in range(len(blocks)):
        load_params_(model, f"model.layers.{i}", files, "cpu", torch.float32)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, tiny_llama(x).logits)
    release_(blocks[0])
    assert all(t.is_meta for t in [*blocks[0].parameters(), *blocks[0].buffers()])
    assert not any(p.is_meta for p in blocks[1].parameters())


def test_weight_files_name_what_is_missing(tmp_path):
    with pytest.raises(onecomp.OneCompError, match="neither model.safetensors nor"):
        WeightFiles(tmp_path)


@pytest.mark.parametrize("quantizer, refiners", [
    (None, [{"name": "qep", "alpha": 0.5}]),  # hessian + cross, layer-by-layer capture
    ({"name": "rtn", "bits": 4}, []),  # data-free: no calibration pass
], ids=["gptq-qep", "rtn"])
def test_streamed_checkpoint_is_bit_identical(tiny_model_dir, tmp_path, quantizer, refiners):
    streamed = onecomp.run(config(tiny_model_dir, tmp_path / "s", True, quantizer, refiners), progress=False)
    whole = onecomp.run(config(tiny_model_dir, tmp_path / "m", False, quantizer, refiners), progress=False)
    assert_identical(checkpoint(tmp_path / "s"), checkpoint(tmp_path / "m"))
    assert streamed["stages"][0]["ppl"] == whole["stages"][0]["ppl"]


def test_streaming_keeps_one_block_resident_and_resumes(tiny_model_dir, tmp_path):
    """While a block's layers are quantized no other block's weights are in memory, nor the embeddings and
    the head; a crash after block 0 resumes to the same checkpoint as the in-memory path."""
    out = tmp_path / "run"
    registry = onecomp.Registry()
    resident, found, crashed, outside = [], [], [], []

    def streamed_model():
        import gc

        if not found:
            found.append(next(o for o in gc.get_objects() if type(o).__name__ == "LlamaForCausalLM"
                              and getattr(getattr(o, "model", None), "layers", None) is not None
                              and any(p.is_meta for p in o.parameters())))
        return found[0]

    class Watch:
        @onecomp.hookimpl
        def on_layer_quantized(self, run, layer):
            blocks = streamed_model().model.layers
            resident.append((int(layer.name.split(".")[2]),
                             {i for i, b in enumerate(blocks) if not all(t.is_meta for t in b.parameters())}))
            model = streamed_model()
            outside.append(model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta)

        @onecomp.hookimpl
        def on_block_done(self, run, block):
            if block.index == 0 and not crashed:
                crashed.append(True)
                raise RuntimeError("simulated crash")

    with registry.temporarily(Watch(), name="watch"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            onecomp.run(config(tiny_model_dir, out, True), registry=registry, progress=False)
        found.clear()  # the resumed run's model is another object
        onecomp.run(config(tiny_model_dir, out, True), registry=registry, resume=True, progress=False)
    assert {b for b, _ in resident} == {0, 1} and all(now == {b} for b, now in resident), resident
    assert outside and all(outside)
    onecomp.run(config(tiny_model_dir, tmp_path / "m", False), progress=False)
    assert_identical(checkpoint(out), checkpoint(tmp_path / "m"))


def test_stream_needs_safetensors_or_gguf(tmp_path):
    from onecomp.models.lazy import local_dir

    with pytest.raises(onecomp.OneCompError, match="model.stream reads a local HF directory"):
        local_dir(str(tmp_path / "nothing"))


def test_streamed_teacher_gives_the_same_refined_checkpoints(tiny_model_dir, tmp_path):
    """blockwise and global read the fp teacher's blocks from the files as they run (never a whole second
    copy) and write the checkpoints the in-memory teacher gives."""
    from onecomp.models.lazy import streamed_teacher

    teacher = streamed_teacher(tiny_model_dir, "float32", "cpu")
    assert all(p.is_meta for p in teacher.model.layers.parameters())
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    whole = load_model(str(tiny_model_dir)).model
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=x).logits, whole(input_ids=x).logits)
    assert all(p.is_meta for p in teacher.model.layers.parameters())  # each block released after it ran

    refiners = [{"name": "blockwise", "epochs": 1, "lr": 1e-2, "batch_size": 1},
                {"name": "global", "epochs": 1, "lr": 1e-2, "batch_size": 1}]
    quantizer = {"name": "rtn", "bits": 2, "group_size": 32}
    onecomp.run(config(tiny_model_dir, tmp_path / "s", True, quantizer, refiners), progress=False)
    onecomp.run(config(tiny_model_dir, tmp_path / "m", False, quantizer, refiners), progress=False)
    for stage in ("02-blockwise", "03-global"):
        assert_identical(load_file(tmp_path / "s" / stage / "model.safetensors"),
                         load_file(tmp_path / "m" / stage / "model.safetensors"))


@pytest.mark.integration
def test_embedded_model_streamed_checkpoint_is_bit_identical(tmp_path):
    """The same check on the real embedded model (its GGUF converted once to an HF directory, then read
    block by block): GPTQ + QEP, streamed and in memory, bit for bit."""
    gptq = {"name": "gptq", "bits": 4, "group_size": 128}
    streamed = onecomp.run(config("smollm2-135m", tmp_path / "s", True, gptq, [{"name": "qep"}]), progress=False)
    whole = onecomp.run(config("smollm2-135m", tmp_path / "m", False, gptq, [{"name": "qep"}]), progress=False)
    assert_identical(checkpoint(tmp_path / "s"), checkpoint(tmp_path / "m"))
    assert streamed["stages"][0]["ppl"] == whole["stages"][0]["ppl"]
