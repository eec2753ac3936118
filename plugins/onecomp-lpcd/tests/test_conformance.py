"""The lpcd plugin through onecomp's conformance kit."""

from onecomp.testing import PluginSuite


class TestLPCDPlugin(PluginSuite):
    distribution = "onecomp-lpcd"
    names = {"refiner": ["lpcd"]}
