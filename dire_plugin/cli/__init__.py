"""Command-line tools: ``dire-apply`` (:mod:`.apply`: apply, undo, verify a patch on an upstream
checkout), ``dire-run`` (:mod:`.run`: run an upstream script with DiRe), ``dire-metrics``
(:mod:`.metrics`: diversity of distilled sets), ``dire`` (:mod:`.main`: ``dire demo``, the embedded
default job). The top layer: may import every other package."""
