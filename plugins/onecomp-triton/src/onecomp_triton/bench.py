"""Benchmark of the ``triton`` backend's kernels: ``python -m onecomp_triton.bench``.

On CUDA it times every kernel (``triton.testing.do_bench``) for a few layer shapes and batch
sizes, against the fp16 ``torch.matmul`` with the dequantized weight and against the
memory-bandwidth roofline: the bytes a call must move (stored tensors, x and y) over the device's
copy bandwidth, measured here with one large device-to-device copy. It prints one markdown
table. Without CUDA it prints that it skipped. ``--interpret`` runs tiny shapes through Triton's
interpreter on the CPU, to check the script itself; its times are no measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .backend import TritonBackend, TritonConfig, triton_available
from .reference import reference_linear

#: (label, format name, params or a function of the shape giving them)
CASES = [
    ("gptq 4-bit g128", "gptq", {"bits": 4, "group_size": 128}),
    ("gptq 4-bit g128 act-order", "gptq", {"bits": 4, "group_size": 128, "act_order": True}),
    ("gptq 3-bit g128", "gptq", {"bits": 3, "group_size": 128}),
    ("gptq 2-bit g64", "gptq", {"bits": 2, "group_size": 64}),
    ("gptq 8-bit per-channel", "gptq", {"bits": 8, "group_size": -1}),
    # about 1.5 bits per weight: P·r(n+m) = 1.5·n·m with P = 2 terms
    ("mdbf ~1.5 bit", "mdbf", lambda n, m: {"rank": max(8, 8 * round(0.375 * n * m / (n + m) / 8)), "terms": 2}),
]


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m onecomp_triton.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=None, help="comma-separated OUTxIN (default 4096x4096,11008x4096,4096x11008)")
    ap.add_argument("--batch", default=None, help="comma-separated rows of x (default 1,16,128)")
    ap.add_argument("--interpret", action="store_true", help="tiny shapes in Triton's interpreter on CPU (a smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _pairs(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def timer(device: torch.device):
    """A function ``f -> seconds per call``: triton's do_bench on CUDA, a median of 3 calls elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda f: do_bench(f, warmup=25, rep=100) / 1e3

    def cpu(f):
        f()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return cpu


def copy_bandwidth(device: torch.device, time_it) -> float:
    """Bytes per second of one large copy (read + write), the roofline's bandwidth."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)  # 1 GiB / 16 MiB of fp32
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    seconds = time_it(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / seconds


def run(argv=None) -> int:
    args = parse_args(argv)
    if not triton_available():
        print("onecomp_triton.bench: skipped, triton is not installed")
        return 0
    if not args.interpret and not torch.cuda.is_available():
        print("onecomp_triton.bench: skipped, no CUDA device (the kernels run on CUDA only; "
              "--interpret checks this script on CPU through Triton's interpreter)")
        return 0
    import onecomp

    registry = onecomp.Registry.default()
    backend = TritonBackend(TritonConfig(interpret=args.interpret, block_n=16, block_k=16) if args.interpret
                            else TritonConfig())
    device = torch.device("cpu") if args.interpret else backend.device()
    dtype = torch.float32 if args.interpret else torch.float16
    shapes = _pairs(args.shapes or ("48x80" if args.interpret else "4096x4096,11008x4096,4096x11008"))
    batches = [int(b) for b in (args.batch or ("1,4" if args.interpret else "1,16,128")).split(",")]
    time_it = timer(device)
    bw = copy_bandwidth(device, time_it)
    where = "Triton interpreter on CPU: times are no measurement" if args.interpret else torch.cuda.get_device_name()
    print(f"# onecomp-triton kernels ({where}; copy bandwidth {bw / 1e9:.1f} GB/s)\n")
    print("| case | shape | batch | kernel µs | fp16 matmul µs | vs fp16 | roofline µs | of roofline | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(args.seed)
    for label, name, params in CASES:
        try:
            cls = registry.get("format", name)
        except onecomp.UnknownComponent:
            print(f"| {label} | format {name!r} is not installed | | | | | | | |")
            continue
        for n, m in shapes:
            fmt = cls.from_dict(params(n, m) if callable(params) else params)
            stored = fmt.pack(fmt.example((n, m), gen), (n, m))
            module = backend.kernel(fmt, stored, (n, m), None)
            if module is None:
                print(f"| {label} | {n}x{m} | declined by the backend | | | | | | |")
                continue
            module = module.to(device)
            W = fmt.dequantize(stored, (n, m)).to(device=device, dtype=dtype)
            stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
            for M in batches:
                x = torch.randn(M, m, generator=gen).to(device=device, dtype=dtype)
                with torch.no_grad():
                    y = module(x)
                    ref = reference_linear(fmt, stored, (n, m), x.float())
                err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                t_kernel = time_it(lambda: module(x))
                t_dense = time_it(lambda: torch.matmul(x, W.T))
                moved = stored_bytes + (M * m + M * n) * x.element_size()
                t_roof = moved / bw
                print(f"| {label} | {n}x{m} | {M} | {t_kernel * 1e6:.1f} | {t_dense * 1e6:.1f} | "
                      f"{t_dense / t_kernel:.2f}x | {t_roof * 1e6:.1f} | {t_roof / t_kernel:.0%} | {err:.1e} |")
            del W, module, stored
    return 0


def main(argv=None):
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
