"""The backend ``triton``: it registers, declines what it cannot run, and falls back where it must."""

import shutil
import subprocess

import pytest
import torch

import onecomp
from onecomp.testing import PluginSuite
from onecomp_triton import TritonBackend, TritonConfig
from onecomp_triton.backend import NATIVE


class TestTritonPlugin(PluginSuite):
    distribution = "onecomp-triton"
    names = {"backend": ["triton"]}  # and importing the plugin must not import triton (forbidden_modules)


def test_onecomp_plugins_lists_it():
    exe = shutil.which("onecomp")
    if exe is None:
        pytest.skip("the onecomp command is not on PATH")
    out = subprocess.run([exe, "plugins"], capture_output=True, text=True, timeout=300, check=True).stdout
    assert any(line.split()[:2] == ["backend", "triton"] and "onecomp-triton" in line for line in out.splitlines())


def test_registry_builds_it_from_a_config():
    registry = onecomp.Registry.default()
    assert registry.get("backend", "triton") is TritonBackend
    with pytest.raises(onecomp.ConfigError):
        TritonConfig(block_n=24)
    with pytest.raises(onecomp.ConfigError):
        TritonConfig(block_k=8)


def gptq(params=None, shape=(8, 32)):
    try:
        cls = onecomp.Registry.default().get("format", "gptq")
    except onecomp.UnknownComponent:
        pytest.skip("format 'gptq' is not installed")
    fmt = cls.from_dict(params or {"bits": 4, "group_size": 16})
    return fmt, fmt.pack(fmt.example(shape, torch.Generator().manual_seed(0)), shape), shape


def test_declines_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backend = TritonBackend()
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    fmt, stored, shape = gptq()
    assert backend.device().type == "cpu"
    assert backend.kernel(fmt, stored, shape, None) is None
    caps = backend.capabilities()
    assert caps.device == "cpu" and dict(caps.formats) == {} and "declined" in caps.notes


def test_honours_triton_interpret_env(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = TritonBackend()
    fmt, stored, shape = gptq()
    assert backend.interpret and backend.kernel(fmt, stored, shape, None) is not None
    assert dict(backend.capabilities().formats) == NATIVE


def test_declines_other_formats_and_layouts():
    pytest.importorskip("triton")
    backend = TritonBackend(TritonConfig(interpret=True))
    fmt, stored, shape = gptq()
    dense = onecomp.Registry.default().get("format", "dense")()
    assert backend.kernel(dense, dense.pack(dense.example(shape, torch.Generator()), shape), shape, None) is None
    assert backend.kernel(fmt, {k: v for k, v in stored.items() if k != "qzeros"}, shape, None) is None


def test_falls_back_to_the_reference_for_autograd_and_bfloat16():
    pytest.importorskip("triton")
    fmt, stored, shape = gptq()
    module = TritonBackend(TritonConfig(interpret=True)).kernel(fmt, stored, shape, None)
    x = torch.randn(3, shape[1], requires_grad=True)
    assert not module.runs_kernel(x) and not module.runs_kernel(x.detach().bfloat16())
    y = module(x)
    y.sum().backward()
    W = fmt.dequantize(stored, shape)
    torch.testing.assert_close(y, x.detach() @ W.T)
    torch.testing.assert_close(x.grad, W.sum(0).expand(3, -1))


def test_bench_skips_without_cuda(capsys):
    from onecomp_triton.bench import run

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert run([]) == 0
    assert "skipped" in capsys.readouterr().out


def test_bench_runs_in_the_interpreter(capsys):
    pytest.importorskip("triton")
    from onecomp_triton.bench import run

    assert run(["--interpret", "--shapes", "24x40", "--batch", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| gptq") or
            line.startswith("| mdbf")]
    assert len(rows) == 6 and all("declined" not in r for r in rows)
    assert all(float(r.split("|")[-2]) < 1e-4 for r in rows)  # max rel err column
