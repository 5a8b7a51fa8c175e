"""One module per upstream method (installed as ``dire_plugin.patches``): its entry scripts, the
upstream symbols it relies on and its capture family, as data; ``patch(config)`` / ``unpatch()``
come from :func:`dire_plugin.hooks.patcher.method_patch`. May import ``hooks`` and below."""
