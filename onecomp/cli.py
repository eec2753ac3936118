"""The ``onecomp`` command: run, plugins, inspect, eval."""

from __future__ import annotations

import argparse
import errno
import json
import sys


def _cmd_run(args) -> int:
    from .pipeline import run

    result = run(args.config, resume=args.resume, force=args.force, output=args.output, progress=not args.quiet)
    from pathlib import Path

    if result.get("leader", True):  # under torchrun, rank 0 alone writes and prints the report
        print((Path(result["output"]) / "report.md").read_text())
    return 0


def _cmd_plugins(args) -> int:
    from .registry import Registry

    reg = Registry.default()
    rows = [{"kind": e.kind, "name": e.name, "distribution": e.dist, "version": e.version, "plugin": e.plugin,
             "config": _config_fields(e.cls.Config)} for e in reg.entries()]
    for r in rows:
        if r["kind"] == "backend":
            r["capabilities"] = _backend_capabilities(reg, r["name"])
    errors = [{"plugin": e.plugin, "distribution": e.dist, "error": e.error} for e in reg.load_errors()]
    if args.json:
        print(json.dumps({"components": rows, "errors": errors}, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows) if rows else 4
    for r in rows:
        print(f"{r['kind']:<12} {r['name']:<{width}}  {r['distribution']} {r['version']}")
        if "capabilities" in r:
            print(f"{'':<12} {'':<{width}}  {_capabilities_line(r['capabilities'])}")
    for e in errors:
        print(f"FAILED       {e['plugin']:<{width}}  {e['distribution']}: {e['error']}")
    return 0


def _backend_capabilities(registry, name: str) -> dict:
    """A backend's ``capabilities()`` with its default config, as a dict (or the error it raised)."""
    try:
        return registry.create(registry.resolve("backend", name, "backend")).capabilities().to_dict()
    except Exception as exc:  # a backend that cannot start here is listed, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}


def _capabilities_line(caps: dict) -> str:
    if "error" in caps:
        return f"capabilities: unavailable ({caps['error']})"
    native = "; ".join(f"{f} {','.join(map(str, b))} bits" for f, b in caps.get("formats", {}).items()) or "none"
    free = f", {caps['free_memory'] / 2**30:.1f} GiB free" if caps.get("free_memory") else ""
    threads = f", {caps['threads']} threads" if caps.get("threads") else ""
    return f"device {caps['device']}{free}{threads}; native kernels: {native}"


def _inspect_backend(args, summary: dict) -> None:
    """``inspect --backend B``: B's capabilities and, for a checkpoint, the kernel each module gets."""
    from pathlib import Path

    from .registry import Registry

    reg = Registry.default()
    report = {"name": args.backend, "capabilities": _backend_capabilities(reg, args.backend)}
    if (Path(args.model) / "onecomp.json").exists():
        from . import load
        from .kernels import kernel_summary

        report["kernels"] = kernel_summary(load(args.model, reg, backend=args.backend))
    summary["backend"] = report
    if not args.json:
        print(f"backend {args.backend}: {_capabilities_line(report['capabilities'])}")
        if report["capabilities"].get("notes"):
            print(f"  {report['capabilities']['notes']}")
        for kernel, n in report.get("kernels", {}).items():
            print(f"  {n} modules run {kernel}")


def _cmd_generate(args) -> int:
    """Load a checkpoint with the backends' kernels and continue a prompt; report speed and kernels."""
    import time

    import torch
    from transformers import AutoTokenizer

    from . import load
    from .kernels import kernel_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = None if args.backend == "reference" else args.backend
    model = load(args.checkpoint, backend=backend)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample \
        else {"do_sample": False}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    from .checkpoint import quantized_modules

    modules = {n: m.kernel_name for n, m in quantized_modules(model).items()}
    result = {"prompt": args.prompt, "text": text, "new_tokens": int(new.numel()), "seconds": seconds,
              "tokens_per_s": new.numel() / seconds, "threads": torch.get_num_threads(),
              "kernels": kernel_summary(model), "modules": modules}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(args.prompt + text)
    print(f"\n{result['new_tokens']} new tokens in {seconds:.2f} s: {result['tokens_per_s']:.2f} tokens/s "
          f"({'sampled' if args.sample else 'greedy'}, {result['threads']} threads, prompt included)")
    for kernel, n in result["kernels"].items():
        print(f"{n} modules ran {kernel}")
    if args.verbose:
        for name, kernel in modules.items():
            print(f"  {name}: {kernel}")
    return 0


def _config_fields(cls) -> dict:
    import attrs

    out = {}
    for a in attrs.fields(cls):
        default = a.default.factory() if isinstance(a.default, attrs.Factory) else a.default
        out[a.name] = default if isinstance(default, (int, float, str, bool, list, type(None))) else repr(default)
    return out


def _cmd_inspect(args) -> int:
    from .models import inspect_model, load_model

    loaded = load_model(args.model, args.dtype, args.trust_remote_code)
    if args.plan:
        return _print_plan(args, loaded)
    summary = inspect_model(loaded.model).summary()
    formats = _quantized_formats(loaded.model)
    if formats:
        summary["quantized"] = formats
    if args.backend:
        _inspect_backend(args, summary)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"model: {args.model} ({summary['model_type']}, {summary['parameters'] / 1e6:.1f} M parameters, "
          f"hidden size {summary['hidden_size']})")
    print(f"blocks: {summary['blocks']} at {summary['blocks_path']}")
    print("linear layers per block (out, in):")
    for name, shape in summary["linears_per_block"].items():
        print(f"  {name:<24} {tuple(shape)}")
    print("fused input groups: " + "; ".join("/".join(g) for g in summary["fused_groups"]))
    for fmt, row in formats.items():
        print(f"quantized: {row['layers']} layers in format {fmt} {row['params']}, "
              f"{row['bits_per_weight']:.4f} bits per weight")
    return 0


def _print_plan(args, loaded) -> int:
    """The plan a config's planner makes for the model, its stored bytes and budget, without quantizing."""
    from .calibration import calibration_windows
    from .components import STATISTICS
    from .config import load_config
    from .models import inspect_model
    from .pipeline.run import make_plan
    from .registry import Registry

    registry = Registry.default()
    cfg = load_config(args.plan, registry)
    inspection = inspect_model(loaded.model)
    planner = registry.create(cfg.planner)
    windows = None
    if set(planner.needs) & (STATISTICS | {"windows"}):
        windows = calibration_windows(loaded.tokenizer, cfg.calibration.corpus, cfg.calibration.samples,
                                      cfg.calibration.seq_len, cfg.calibration.seed)
    plan = make_plan(planner, inspection, cfg, registry, loaded.model, windows, progress=not args.json)
    shapes = {f"{b.prefix}.{rel}": tuple(s) for b in inspection.blocks for rel, s in b.linears.items()}
    rows: dict = {}
    for name, spec in plan.items():
        row = rows.setdefault(json.dumps(spec.to_dict(), sort_keys=True), {"quantizer": spec.to_dict(), "layers": 0,
                                                                          "weights": 0, "bits": 0})
        row["layers"] += 1
        row["weights"] += shapes[name][0] * shapes[name][1]
        row["bits"] += registry.create(spec).format_for(shapes[name]).expected_bits(shapes[name])
    bits, weights = sum(r["bits"] for r in rows.values()), sum(r["weights"] for r in rows.values())
    report = planner.report() if hasattr(planner, "report") else {}  # planners need not subclass Planner
    result = {"planner": cfg.planner.to_dict(), "layers": {k: v.to_dict() for k, v in plan.items()},
              "by_quantizer": list(rows.values()), "planned_bits": bits, "planned_bytes": bits / 8,
              "bits_per_weight": bits / weights, "budget": {k: v for k, v in report.items() if k != "layers"}}
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"plan by {cfg.planner.name} for {args.model}: {len(plan)} layers")
    for r in rows.values():
        print(f"  {r['layers']:>4} layers  {r['bits'] / r['weights']:.4f} bits/weight  {r['quantizer']}")
    print(f"planned layers: {bits} bits = {bits / 8 / 2**20:.2f} MiB, {bits / weights:.4f} bits per weight")
    if "budget_bits" in report:
        print(f"budget: {report['budget_bits']} bits ({report['budget_bpw']:.4f} bits per weight), "
              f"from {report.get('budget_source', '?')}")
    return 0


def _quantized_formats(model) -> dict:
    """Per format: how many layers of a loaded checkpoint use it, with which params, at what bits."""
    from .checkpoint import quantized_modules
    from .components import stored_bits

    out: dict = {}
    for m in quantized_modules(model).values():
        row = out.setdefault(m.format.name, {"layers": 0, "params": set(), "bits": 0, "weights": 0})
        row["layers"] += 1
        row["params"].add(str(m.format.to_dict()))
        row["bits"] += stored_bits(m.stored())
        row["weights"] += m.in_features * m.out_features
    return {k: {"layers": r["layers"], "params": "; ".join(sorted(r["params"])),
                "bits_per_weight": r["bits"] / r["weights"]} for k, r in out.items()}


def _cmd_eval(args) -> int:
    from .evaluation import eval_windows, perplexity
    from .models import load_model

    loaded = load_model(args.model, args.dtype, args.trust_remote_code)
    if args.tasks:
        return _eval_tasks(args, loaded)
    result = {}
    for text in args.text:
        windows = eval_windows(loaded.tokenizer, text, args.windows, args.seq_len)
        result[text] = perplexity(loaded.model, windows, args.batch_size, progress=not args.quiet, desc=text)
    if args.json:
        print(json.dumps({"model": args.model, "ppl": result}, indent=2))
    else:
        for text, ppl in result.items():
            print(f"{text}: ppl {ppl:.3f}")
    return 0


def _eval_tasks(args, loaded) -> int:
    """lm-evaluation-harness tasks on the loaded model (and perplexity too when --text is given)."""
    from .evaluation.harness import plain_results, run_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out = run_tasks(loaded.model, loaded.tokenizer, tasks, include_path=args.include_path,
                    batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot)
    rows = plain_results(out)
    if args.text:
        from .evaluation import eval_windows, perplexity

        for text in args.text:
            windows = eval_windows(loaded.tokenizer, text, args.windows, args.seq_len)
            rows[f"ppl:{text}"] = {"ppl": perplexity(loaded.model, windows, args.batch_size)}
    if args.json:
        print(json.dumps({"model": args.model, "tasks": rows, "versions": out["versions"]}, indent=2, default=str))
        return 0
    for task, metrics in rows.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in metrics.items()))
    return 0


def _cmd_export(args) -> int:
    from .export import export

    out = export(args.checkpoint, args.to, args.out, force=args.force, shard_size=args.shard_size)
    print(f"wrote {out} ({args.to})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="onecomp", description="Compress language models after training.")
    p.add_argument("--version", action="version", version=f"onecomp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a pipeline (no CONFIG: the embedded default, GPTQ 4-bit g128 + QEP on SmolLM2-135M)")
    r.add_argument("config", nargs="?", help="a .toml, .yaml or .json pipeline config")
    r.add_argument("--resume", action="store_true", help="continue a crashed run in its output directory")
    r.add_argument("--force", action="store_true", help="delete an existing run in the output directory first")
    r.add_argument("--output", help="output directory (overrides output.dir)")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=_cmd_run)

    pl = sub.add_parser("plugins", help="list installed components and plugin load errors")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_cmd_plugins)

    i = sub.add_parser("inspect", help="show a model's blocks, linear layers and fused input groups")
    i.add_argument("model", help="smollm2-135m, an HF directory or hub id, a .gguf file, or a checkpoint")
    i.add_argument("--dtype", default="float32")
    i.add_argument("--trust-remote-code", action="store_true", help="let a plain HF model run its own code")
    i.add_argument("--json", action="store_true")
    i.add_argument("--backend", help="also show this backend's capabilities and, for a checkpoint, the kernel "
                                     "each module would run")
    i.add_argument("--plan", metavar="CONFIG",
                   help="print the plan of CONFIG's planner for the model (bytes, budget) without quantizing")
    i.set_defaults(func=_cmd_inspect)

    g = sub.add_parser("generate", help="continue a prompt with a checkpoint run by the backends' kernels")
    g.add_argument("checkpoint", help="a onecomp checkpoint directory")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", default="auto", help="auto, a backend name, or reference (dequantize, then matmul)")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--verbose", action="store_true", help="list the kernel of every module")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_cmd_generate)

    e = sub.add_parser("eval", help="perplexity of a model or checkpoint (the protocol of docs/protocol.md)")
    e.add_argument("model", help="smollm2-135m, an HF directory or hub id, a .gguf file, or a checkpoint")
    e.add_argument("--text", action="append", help="kjv-gospels, pydoc-topics or a text file (repeatable)")
    e.add_argument("--windows", type=int, default=40)
    e.add_argument("--trust-remote-code", action="store_true", help="let a plain HF model run its own code")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--dtype", default="float32")
    e.add_argument("--json", action="store_true")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (needs onecomp[lm-eval]); "
                                   "perplexity then runs only for an explicit --text")
    e.add_argument("--include-path", action="append", help="a directory of lm-eval task YAML files (repeatable)")
    e.add_argument("--limit", type=int, help="at most this many documents per lm-eval task")
    e.add_argument("--num-fewshot", type=int, help="few-shot examples per lm-eval task (default: the task's)")
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", help="write a checkpoint as compressed-tensors, gptq or gguf for other runtimes")
    x.add_argument("checkpoint", help="a onecomp checkpoint directory")
    x.add_argument("--to", required=True, choices=["compressed-tensors", "gptq", "gguf"], help="target format")
    x.add_argument("out", help="output directory (a .gguf file for --to gguf)")
    x.add_argument("--force", action="store_true", help="replace a non-empty output")
    x.add_argument("--shard-size", default=None, help="shard weight files past this size (default 5GB)")
    x.set_defaults(func=_cmd_export)
    return p


def main(argv=None) -> int:
    from .errors import OneCompError

    args = build_parser().parse_args(argv)
    if getattr(args, "text", None) is None and args.command == "eval" and not args.tasks:
        args.text = ["kjv-gospels", "pydoc-topics"]
    for flag in ("windows", "seq_len", "batch_size"):
        value = getattr(args, flag, None) if args.command == "eval" else None
        if value is not None and value < 1:
            print(f"error: --{flag.replace('_', '-')}: must be a positive integer, got {value}", file=sys.stderr)
            return 2
    try:
        if args.command == "eval":  # a missing, binary or non-UTF-8 text fails before the model loads
            from .config import _check_text_source

            for i, text in enumerate(args.text or []):
                _check_text_source(text, f"--text[{i}]" if len(args.text) > 1 else "--text")
        return args.func(args)
    except OneCompError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only or vanished directory: the file and the reason
        hint = "; free some space and rerun with --resume" if exc.errno == errno.ENOSPC else ""
        print(f"error: {exc.filename or 'file system'}: {exc.strerror or exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished blocks and stages are kept — rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
