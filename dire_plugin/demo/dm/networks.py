"""Networks the demo's DM-shaped script builds (through ``utils.get_network``), imported as
``networks`` as DC-BENCH's script imports its own: the matching methods' ConvNet at the digits'
scale, whose ``embed`` DM matches (and DiRe's embed capture wraps)."""
from dire_plugin.demo.model import MatchingConvNet

ConvNet = MatchingConvNet  # the class itself, not a subclass: a patch wraps ConvNet.embed where it is defined

__all__ = ["ConvNet"]
