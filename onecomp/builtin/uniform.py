"""Planner ``uniform``: one quantizer config for every decoder linear layer (minus ``ignore``)."""

from __future__ import annotations

import attrs

from ..components import Planner, matches
from ..errors import ConfigError
from ..hookspecs import hookimpl


@attrs.define
class UniformConfig:
    ignore: list = attrs.Factory(list)  # exact names, suffixes like "mlp.down_proj", or "re:<regex>"


class Uniform(Planner):
    """Every linear layer of every decoder block gets the configured quantizer."""

    name = "uniform"
    Config = UniformConfig
    requires_quantizer = True

    def plan(self, inspection, quantizer, registry):
        if quantizer is None:
            raise ConfigError("plan.quantizer", "the uniform planner needs a quantizer table, "
                              f"e.g. {{ name = \"gptq\", bits = 4 }}; installed: {', '.join(registry.names('quantizer'))}")
        return {name: quantizer for name in inspection.linear_names() if not matches(name, self.config.ignore)}


@hookimpl
def register_planners(register):
    register(Uniform)
