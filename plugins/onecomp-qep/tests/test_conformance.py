"""The qep plugin through onecomp's conformance kit."""

from onecomp.testing import PluginSuite


class TestQEPPlugin(PluginSuite):
    distribution = "onecomp-qep"
    names = {"refiner": ["qep"]}
