"""``dire demo``: SRe²L ± DiRe on scikit-learn's digits, end to end, offline (or on CIFAR-10/100
the user has, on the GPU when there is one).

Modules, one job each: :mod:`.spec` (the datasets' facts, torch-free), :mod:`.patch` (the
demo's own patch: its recover script, not pinned to any upstream; the launcher loads it),
:mod:`.data`, :mod:`.model`, :mod:`.teacher` (squeeze), :mod:`.variants` (the sets compared),
:mod:`.synth` (runs ``recover/recover.py`` vanilla and through the launcher, checks the DiRe
manifests), :mod:`.relabel` and :mod:`.evaluate` (students), :mod:`.measure` (metrics on teacher
embeddings), :mod:`.tables` (report and verdict), :mod:`.plots`, :mod:`.pipeline` (all of it in
order); ``dire demo`` (:mod:`dire_plugin.cli.main`) is its command line.

Kept import-free here: the launcher imports this package (through the patch module) in every
DiRe recover run. May import every package but ``cli``.
"""
