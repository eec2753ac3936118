"""The signlock plugin through onecomp's conformance kit."""

from onecomp.testing import PluginSuite


class TestSignLockPlugin(PluginSuite):
    distribution = "onecomp-signlock"
    names = {"regularizer": ["signlock"]}
