"""One module per upstream method (installed as ``dire_plugin.patches``).

Each module declares its hook targets as data and offers idempotent ``patch(config)`` /
``unpatch()`` built on ``wrapt``; see the drop-in patching issue.
"""
