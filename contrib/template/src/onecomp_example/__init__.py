"""A template onecomp plugin: the ``example-absmax`` quantizer and the ``example-int8`` format.

Keep this module light: onecomp imports the plugin when its registry loads, so
heavy dependencies belong inside the methods that need them.
"""

from .format import ExampleInt8
from .quantizer import AbsmaxConfig, ExampleAbsmax

__all__ = ["AbsmaxConfig", "ExampleAbsmax", "ExampleInt8"]
