"""Random config trees and hostile config files: each loads or raises ConfigError naming a field or file."""

import copy
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onecomp import ConfigError, Registry
from onecomp.cli import main as cli
from onecomp.config import load_config, read_file

VALID = {
    "model": {"id": "smollm2-135m", "dtype": "float32"},
    "calibration": {"corpus": [{"source": "kjv", "weight": 1.0}], "samples": 4, "seq_len": 64, "keep_mb": 8.0},
    "plan": {"planner": "uniform", "quantizer": {"name": "gptq", "bits": 4, "group_size": 32, "damp": 0.01}},
    "refiners": [{"name": "qep"}, {"name": "blockwise", "epochs": 1}],
    "evaluation": {"texts": ["kjv-gospels"], "windows": 2},
    "output": {"dir": "runs/x"},
    "seed": 0,
}

garbage = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63) | st.floats() |
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]) | st.text(max_size=6) | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(), inner,
                                                                max_size=3),
    max_leaves=10)


def paths(tree, prefix=()):
    """Every (path, node) of a nested dict/list tree."""
    yield prefix, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from paths(v, (*prefix, i))


@pytest.fixture(scope="module")
def registry():
    return Registry.default()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_config_trees_load_or_name_the_field(registry, data):
    tree = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(list(paths(tree))))[0]
        value = data.draw(garbage)
        if not where:
            tree = value
            break
        parent = tree
        for k in where[:-1]:
            parent = parent[k]
        parent[where[-1]] = value
    try:
        load_config(tree, registry)
    except ConfigError as exc:
        assert str(exc) and (exc.path or not isinstance(tree, dict)), exc


@pytest.mark.parametrize("field, value", [
    ("plan.quantizer.damp", math.nan), ("plan.quantizer.shrink", math.nan), ("plan.quantizer.damp", math.inf),
    ("calibration.keep_mb", math.nan), ("calibration.keep_mb", math.inf), ("calibration.corpus[0].weight", math.nan),
    ("calibration.corpus[0].weight", math.inf), ("refiners[1].lr", math.nan), ("plan.quantizer.damp", -math.inf)])
def test_nan_and_infinities_are_refused_for_every_float_field(registry, field, value):
    tree = copy.deepcopy(VALID)
    node = tree
    keys = field.replace("[", ".").replace("]", "").split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    node[keys[-1]] = value
    with pytest.raises(ConfigError) as err:
        load_config(tree, registry)
    assert str(err.value).startswith(field + ":"), err.value


@pytest.mark.parametrize("name, content, message", [
    ("latin1.toml", "[model]\nid = \"caf\xe9\"\n".encode("latin-1"), "not UTF-8"),
    ("binary.yaml", bytes(range(256)), "not UTF-8"),
    ("nul.json", b"{\"seed\": 0}\x00\x00", "cannot parse"),
    ("list.json", b"[1, 2]", "top level must be a table"),
    ("scalar.yaml", b"42", "top level must be a table"),
    ("string.yaml", b"just text", "top level must be a table"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "cannot parse|top level"),
    ("bomb.yaml", b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        b"%s: &%s [*%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s]\n" % ((bytes([98 + i]),) * 2 + (bytes([97 + i]),) * 9)
        for i in range(9)), "expands to more than"),
    ("section.toml", b"model = 5\n", "model: must be a table"),
    ("calib.toml", b"calibration = \"kjv\"\n", "calibration: must be a table"),
    ("plan.yaml", b"plan: [1, 2]\n", "plan: must be a table"),
    ("name.toml", b"[plan]\nquantizer = { name = 5 }\n", "plan.quantizer"),
    ("refiner.yaml", b"plan: {quantizer: rtn}\nrefiners: [{name: [qep]}]\n", r"refiners\[0\].name: must be a string"),
    ("backend.json", b"{\"plan\": {\"quantizer\": \"rtn\"}, \"backend\": 7}", "backend"),
    ("require.toml", b"[plugins]\nrequire = \"onecomp-gptq\"\n", "plugins.require"),
    ("keys.yaml", b"1: 2\n", "1"),
    ("source.toml", b"[calibration]\ncorpus = \"a\\u0000b\"\n", "calibration.corpus"),
    ("suffix.txt", b"seed = 0", "must end in"),
])
def test_hostile_config_files_are_one_clean_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert cli(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_directory_or_missing_config_is_a_clean_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_file(tmp_path / "none.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="regular file"):
        read_file(tmp_path / "dir.toml")


@pytest.mark.parametrize("content, message", [(b"caf\xe9 au lait", "is not UTF-8 text"), (b"\x00\x01\x02", "binary"),
                                              (b"", "is empty"), (b"ok \xe2\x82", "ends inside a character")])
@pytest.mark.parametrize("field", ["calibration.corpus[0].source", "evaluation.texts[0]"])
def test_corpus_and_evaluation_files_must_be_text(registry, tmp_path, content, message, field):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    tree = copy.deepcopy(VALID)
    if field.startswith("calibration"):
        tree["calibration"]["corpus"] = [{"source": str(path)}]
    else:
        tree["evaluation"]["texts"] = [str(path)]
    with pytest.raises(ConfigError, match=f"{message}") as err:
        load_config(tree, registry)
    assert str(err.value).startswith(field + ":")
