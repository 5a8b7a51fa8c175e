"""Command-line tools: ``dire-apply`` (:mod:`.apply`: apply, undo, verify a patch on an upstream
checkout), ``dire-metrics`` (:mod:`.metrics`: diversity of distilled sets), ``dire`` (:mod:`.main`:
``dire demo``, the embedded default job). ``dire-run`` lives in :mod:`dire_plugin.launcher`."""
