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

    print((Path(result["output"]) / "report.md").read_text())
    return 0


def _cmd_plugins(args) -> int:
    from .registry import Registry

    reg = Registry.default()
    rows = [{"kind": e.kind, "name": e.name, "distribution": e.dist, "version": e.version, "plugin": e.plugin,
             "config": _config_fields(e.cls.Config)} for e in reg.entries()]
    errors = [{"plugin": e.plugin, "distribution": e.dist, "error": e.error} for e in reg.load_errors()]
    if args.json:
        print(json.dumps({"components": rows, "errors": errors}, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows) if rows else 4
    for r in rows:
        print(f"{r['kind']:<12} {r['name']:<{width}}  {r['distribution']} {r['version']}")
    for e in errors:
        print(f"FAILED       {e['plugin']:<{width}}  {e['distribution']}: {e['error']}")
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
    summary = inspect_model(loaded.model).summary()
    formats = _quantized_formats(loaded.model)
    if formats:
        summary["quantized"] = formats
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
    i.set_defaults(func=_cmd_inspect)

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
    e.set_defaults(func=_cmd_eval)
    return p


def main(argv=None) -> int:
    from .errors import OneCompError

    args = build_parser().parse_args(argv)
    if getattr(args, "text", None) is None and args.command == "eval":
        args.text = ["kjv-gospels", "pydoc-topics"]
    for flag in ("windows", "seq_len", "batch_size"):
        value = getattr(args, flag, None) if args.command == "eval" else None
        if value is not None and value < 1:
            print(f"error: --{flag.replace('_', '-')}: must be a positive integer, got {value}", file=sys.stderr)
            return 2
    try:
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
