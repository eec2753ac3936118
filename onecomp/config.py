"""The pipeline config: an attrs tree loaded from TOML, YAML, JSON or a dict, validated up front.

Every error names its path (``refiners[1].alpha: must be in [0, 1]``) and what is
allowed. Component tables (``{name = "gptq", bits = 4}``) are validated by the
named component's own attrs ``Config`` through the registry, before any work starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import attrs

from .components import ComponentSpec
from .errors import ConfigError
from .validation import build_config, in_range, one_of, positive

# ------------------------------------------------------------------ the pipeline config


@attrs.define
class ModelSection:
    """Which model to compress: the embedded default, an HF id or directory, or a .gguf file."""

    id: str = "smollm2-135m"
    dtype: str = attrs.field(default="float32", validator=one_of("float32", "bfloat16", "float16"))
    trust_remote_code: bool = False
    # the layer-wise stage reads one decoder block at a time from the model's safetensors files instead of
    # loading the whole model (docs/scaling.md)
    stream: bool = False


@attrs.define
class CorpusSpec:
    """One calibration corpus and its weight in a mix."""

    source: str = "kjv"
    weight: float = attrs.field(default=1.0, validator=in_range(0, None, lo_open=True))
    split: str = "train"
    text_field: str = "text"


@attrs.define
class CalibrationSection:
    """Calibration text and how many windows of how many tokens to draw from it."""

    corpus: list = attrs.Factory(lambda: [CorpusSpec()])
    samples: int = attrs.field(default=128, validator=positive)
    seq_len: int = attrs.field(default=512, validator=positive)
    seed: int = 0
    batch_size: int = attrs.field(default=8, validator=positive)
    # "layer": each input group is calibrated after the groups before it in the block are quantized
    # (Llama-style blocks without the 'cross' statistic); "block": one statistics pass per block on its
    # original weights (docs/config.md, [calibration])
    sequential: str = attrs.field(default="layer", validator=one_of("layer", "block"))
    # layer mode: MiB of down_proj inputs kept per block instead of running gate/up a second time
    keep_mb: float = attrs.field(default=512, validator=in_range(0, None))


@attrs.define
class EvaluationSection:
    """Perplexity texts (docs/protocol.md): ``kjv-gospels``, ``pydoc-topics`` or a text file path."""

    texts: list = attrs.Factory(lambda: ["kjv-gospels", "pydoc-topics"])
    windows: int = attrs.field(default=40, validator=positive)
    seq_len: int = attrs.field(default=512, validator=positive)
    batch_size: int = attrs.field(default=1, validator=positive)  # the logits dominate memory, not speed
    before: bool = True


def _shard_size(inst, attribute, value):
    """attrs validator: bytes as a positive integer or a size string like "5GB"."""
    from .checkpoint.shards import parse_size
    from .errors import CheckpointError

    try:
        parse_size(value)
    except CheckpointError as exc:
        raise ConfigError(attribute.name, str(exc)) from None


@attrs.define
class OutputSection:
    dir: str = "runs/default"
    # weight files past this size are split into shards with an index, like save_pretrained
    shard_size: int | str = attrs.field(default="5GB", validator=_shard_size)


@attrs.define
class PipelineConfig:
    """The whole pipeline, as a user writes it in a config file."""

    model: ModelSection = attrs.Factory(ModelSection)
    calibration: CalibrationSection = attrs.Factory(CalibrationSection)
    planner: ComponentSpec | None = None
    quantizer: ComponentSpec | None = None
    refiners: list = attrs.Factory(list)  # list[ComponentSpec]
    #: per refiner, its regularizers as ComponentSpecs (resolved once, from the refiner's config)
    regularizers: list = attrs.Factory(list)
    backend: ComponentSpec | None = None
    evaluation: EvaluationSection = attrs.Factory(EvaluationSection)
    output: OutputSection = attrs.Factory(OutputSection)
    seed: int = 0
    raw: dict = attrs.Factory(dict)

    def to_dict(self) -> dict:
        return self.raw


DEFAULT_PIPELINE = {
    "model": {"id": "smollm2-135m"},
    "calibration": {"corpus": "kjv", "samples": 128, "seq_len": 512},
    "plan": {"planner": "uniform",
             "quantizer": {"name": "gptq", "bits": 4, "group_size": 128}},
    "refiners": [{"name": "qep"}],
    "output": {"dir": "runs/default"},
}

_TOP_KEYS = ("model", "calibration", "plan", "refiners", "backend", "evaluation", "output", "seed", "plugins")


#: the largest config file read, and the most values a YAML file may expand to through its aliases
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_NODES = 100_000


def read_file(path: str | os.PathLike) -> dict:
    """Parse a TOML, YAML or JSON config file into a dict; every failure is a ConfigError naming the file."""
    p = Path(path)
    where = str(p)
    if not p.exists():
        raise ConfigError("", f"config file {where!r} does not exist")
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(where, "a config file must end in .toml, .yaml, .yml or .json")
    if not p.is_file() or p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(where, f"must be a regular file of at most {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(where, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(where, f"cannot be read: {exc.strerror}") from None
    try:
        if suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
            raw = {} if raw is None else raw
    except (Exception, RecursionError) as exc:
        raise ConfigError(where, f"cannot parse: {' '.join(str(exc).split())[:300]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(where, f"the top level must be a table (key = value pairs), got {type(raw).__name__}")
    _check_size(raw, where)
    return raw


def _check_size(raw, where: str) -> None:
    """Refuse a tree of more than MAX_CONFIG_NODES values (YAML aliases can expand without bound)."""
    seen, todo = 0, [raw]
    while todo:
        node = todo.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise ConfigError(where, f"expands to more than {MAX_CONFIG_NODES} values (YAML anchors and aliases "
                                     "that repeat each other?)")
        if isinstance(node, dict):
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)


def _resolve(registry, kind: str, table, path: str):
    """``registry.resolve`` after checking that the component's name is a string."""
    name = table.get("name") if isinstance(table, Mapping) else table
    if isinstance(table, (str, Mapping)) and not isinstance(name, str) and not (isinstance(table, Mapping)
                                                                                and "name" not in table):
        raise ConfigError(f"{path}.name" if isinstance(table, Mapping) else path,
                          f"must be a string naming a {kind}, got {name!r}; installed: "
                          f"{', '.join(registry.names(kind))}")
    return registry.resolve(kind, table, path)


def _table(raw: Mapping, key: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a table, got {value!r}")
    return dict(value)


def _corpora(value, path: str) -> list[CorpusSpec]:
    if isinstance(value, (str, Mapping)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a corpus name, a path, or a list of {source, weight} tables")
    out = []
    for i, item in enumerate(value):
        item = {"source": item} if isinstance(item, str) else item
        spec = build_config(CorpusSpec, item, f"{path}[{i}]")
        _check_text_source(spec.source, f"{path}[{i}].source")
        out.append(spec)
    return out


def _check_text_file(file: Path, path: str) -> None:
    """A text file for calibration or evaluation must be non-empty UTF-8 text without NUL bytes."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            size += len(chunk)
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise ConfigError(path, f"{str(file)!r} is not UTF-8 text ({exc.reason} near byte "
                                        f"{size - len(chunk) + exc.start})") from None
            if "\0" in text:
                raise ConfigError(path, f"{str(file)!r} is a binary file (it holds NUL bytes), not text")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ConfigError(path, f"{str(file)!r} is not UTF-8 text (it ends inside a character)") from None
    if not size:
        raise ConfigError(path, f"{str(file)!r} is empty")


def _check_text_source(source: str, path: str) -> None:
    """A named text, an ``hf:`` dataset spec, or an existing file: checked before any work."""
    from .calibration.corpus import NAMED

    if source in NAMED or source.startswith("hf:"):
        return
    try:
        file = Path(source).expanduser()
        is_file = file.is_file()
    except (ValueError, RuntimeError, OSError):  # a NUL byte, an unknown ~user, a name too long
        is_file = False
    if is_file:
        return _check_text_file(file, path)
    raise ConfigError(path, f"{source!r} is not one of {', '.join(NAMED)}, an existing file, "
                            "or an 'hf:name[:config]' dataset")


def load_config(source: str | os.PathLike | Mapping | None = None, registry=None) -> PipelineConfig:
    """Validate a whole pipeline config (a path, a dict, or None for the embedded default)."""
    from .registry import Registry

    registry = registry or Registry.default()
    if source is not None and not isinstance(source, (str, os.PathLike, Mapping)):
        raise ConfigError("config", f"must be a file path, a dict or None, got {type(source).__name__}")
    raw = DEFAULT_PIPELINE if source is None else (dict(source) if isinstance(source, Mapping) else read_file(source))
    if isinstance(source, Mapping):
        _check_size(raw, "config")
    not_str = [k for k in raw if not isinstance(k, str)]
    if not_str:
        raise ConfigError(str(not_str[0]), f"section names must be strings; allowed: {', '.join(_TOP_KEYS)}")
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(unknown[0] or repr(unknown[0]), f"unknown section; allowed: {', '.join(_TOP_KEYS)}")
    _check_required_plugins(raw.get("plugins", {}))

    model = build_config(ModelSection, raw.get("model", {}), "model")
    cal = _table(raw, "calibration")
    corpus = _corpora(cal.pop("corpus", "kjv"), "calibration.corpus")
    calibration = build_config(CalibrationSection, cal, "calibration")
    calibration.corpus = corpus
    evaluation = build_config(EvaluationSection, raw.get("evaluation", {}), "evaluation")
    for i, text in enumerate(evaluation.texts):
        if not isinstance(text, str):
            raise ConfigError(f"evaluation.texts[{i}]", f"must be a string, got {text!r}")
        _check_text_source(text, f"evaluation.texts[{i}]")
    output = build_config(OutputSection, raw.get("output", {}), "output")

    plan = _table(raw, "plan")
    planner_table = plan.pop("planner", "uniform")
    quantizer_table = plan.pop("quantizer", None)
    if isinstance(planner_table, str):
        planner_table = {"name": planner_table, **plan}  # extra [plan] keys are the planner's params
    elif plan:
        raise ConfigError(f"plan.{sorted(plan)[0]}", "unknown key; put planner params in the planner table")
    planner = _resolve(registry, "planner", planner_table, "plan.planner")
    quantizer = _resolve(registry, "quantizer", quantizer_table, "plan.quantizer") if quantizer_table else None
    if quantizer is None and getattr(registry.get("planner", planner.name), "requires_quantizer", False):
        raise ConfigError("plan.quantizer", f"the {planner.name!r} planner needs a quantizer table, e.g. "
                          f"{{ name = \"gptq\", bits = 4 }}; installed: {', '.join(registry.names('quantizer'))}")

    refiners, regularizers = [], []
    tables = raw.get("refiners", [])
    if not isinstance(tables, list):
        raise ConfigError("refiners", "must be a list of refiner tables ([[refiners]] in TOML)")
    for i, table in enumerate(tables):
        spec = _resolve(registry, "refiner", table, f"refiners[{i}]")
        regs = getattr(spec.config, "regularizers", None) or []
        if not isinstance(regs, list):
            raise ConfigError(f"refiners[{i}].regularizers", "must be a list of regularizer tables")
        regularizers.append([_resolve(registry, "regularizer", reg, f"refiners[{i}].regularizers[{j}]")
                             for j, reg in enumerate(regs)])
        refiners.append(spec)
    backend = _resolve(registry, "backend", raw.get("backend", "torch"), "backend")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError("seed", f"must be an integer, got {seed!r}")
    return PipelineConfig(model=model, calibration=calibration, planner=planner, quantizer=quantizer,
                          refiners=refiners, regularizers=regularizers, backend=backend, evaluation=evaluation, output=output,
                          seed=seed, raw=json.loads(json.dumps(raw, default=str)))


def _check_required_plugins(section) -> None:
    """``[plugins] require = ["onecomp-gptq>=0.1"]``: fail early when a distribution is missing."""
    if not section:
        return
    if not isinstance(section, Mapping) or set(section) - {"require"}:
        raise ConfigError("plugins", "allowed key: require (a list of distribution requirements)")
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement

    require = section.get("require", [])
    if not isinstance(require, list):
        raise ConfigError("plugins.require",
                          f"must be a list of requirements like 'onecomp-gptq>=0.1', got {require!r}")
    for i, text in enumerate(require):
        where = f"plugins.require[{i}]"
        try:
            req = Requirement(str(text))
        except InvalidRequirement as exc:
            raise ConfigError(where, f"not a requirement like 'onecomp-gptq>=0.1': {exc}") from None
        try:
            have = version(req.name)
        except PackageNotFoundError:
            raise ConfigError(where, f"{req.name} is not installed: pip install '{text}'") from None
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            raise ConfigError(where, f"{req.name} {have} is installed but {text} is required: pip install '{text}'")
