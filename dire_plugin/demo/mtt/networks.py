"""Networks the demo's MTT-shaped scripts build (through ``utils.get_network``), imported as
``networks`` as MTT's scripts import their own: the matching methods' ConvNet at the digits' scale
(instance norm, no BatchNorm: an expert buffer holds parameters only)."""
from dire_plugin.demo.model import MatchingConvNet

ConvNet = MatchingConvNet

__all__ = ["ConvNet"]
