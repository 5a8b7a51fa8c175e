"""``import dire_plugin.auto`` as the first line of an upstream script turns DiRe on for it.

The script must lie in a checkout prepared with ``dire-apply`` (its settings are read from
there). Asking for DiRe and not getting it is an error, not a silent vanilla run.
"""
from .activation.startup import activate

activate(required=True)

loaded = True
