"""docs/config.md's component reference is generated from the registered components and kept current."""

import importlib.util
from pathlib import Path

import attrs
import pytest

import onecomp

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_config_docs.py"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_component_reference_is_current(gen):
    text = gen.CONFIG_MD.read_text()
    assert gen.START in text and gen.END in text, "docs/config.md lost its component-reference markers"
    assert gen.rewrite(text, gen.render()) == text, \
        "docs/config.md's component reference is stale: run `python scripts/gen_config_docs.py`"


def test_rendering_is_deterministic(gen):
    assert gen.render() == gen.render()


def test_every_first_party_field_is_listed(gen):
    page = gen.render()
    ours = gen.first_party()
    entries = [e for e in onecomp.Registry.default().entries() if e.dist in ours]
    assert entries, "no first-party component is registered"
    for e in entries:
        heading = f"#### {e.kind} `{e.name}` ({e.dist})"
        assert heading in page
        section = page.split(heading, 1)[1].split("\n#### ", 1)[0]
        for f in attrs.fields(e.cls.Config):
            assert f"| `{f.name}` |" in section, f"{e.kind} {e.name}: field {f.name} is missing"


def test_sorted_by_kind_and_name(gen):
    headings = [line.split("`") for line in gen.render().splitlines() if line.startswith("#### ")]
    keys = [(h[0].split()[1], h[1]) for h in headings]
    assert keys == sorted(keys)


def test_comments_come_from_the_source_and_its_bases(gen):
    @attrs.define
    class Base:
        #: first line of a note
        #: wrapped onto a second
        a: int = 1
        b: str = "x"  # a trailing note

    @attrs.define
    class Child(Base):
        # the child's own note
        b: str = "y"
        c: list = attrs.Factory(lambda: ["mlp.down_proj"])

    assert gen.field_comment(Child, "a") == "first line of a note wrapped onto a second"
    assert gen.field_comment(Child, "b") == "the child's own note; a trailing note"
    assert gen.field_comment(Child, "c") == ""
    fields = {f.name: f for f in attrs.fields(Child)}
    assert gen.default_of(fields["b"]) == '`"y"`'
    assert gen.default_of(fields["c"]) == '`["mlp.down_proj"]`'
    assert gen.type_of(fields["a"]) == "int"


def test_a_table_cell_cannot_break_the_table(gen):
    assert gen.cell("mean |w| at init") == "mean \\|w\\| at init"
