"""``dire demo``: SRe²L, DWA, DM and MTT ± DiRe on scikit-learn's digits, end to end, offline (or
the SRe²L family on CIFAR-10/100 the user has, on the GPU when there is one).

Modules, one job each: :mod:`.spec` (the datasets' and families' fixed facts, torch-free),
:mod:`.families` (each family's script, internal patch, command line, outputs and evaluation),
:mod:`.patches` (the demo's patch per family: its real patch's capture, options and weights over
our scripts; the launcher loads them), the family scripts in ``recover/``, ``dwa/``, ``dm/`` and
``mtt/`` (run as upstream scripts are) with what they share (:mod:`.script_args`, :mod:`.outputs`,
:mod:`.dsa`), :mod:`.data`, :mod:`.model`, :mod:`.cache` (checked cache folders), :mod:`.teacher`
(squeeze), :mod:`.experts` (MTT's expert buffer), :mod:`.variants` (the sets compared),
:mod:`.synth` (runs the scripts vanilla and through the launcher, checks the DiRe manifests),
:mod:`.relabel`, :mod:`.hardlabel` and :mod:`.evaluate` (students, by each family's protocol),
:mod:`.measure` (metrics on teacher embeddings), :mod:`.stats` (the paired test), :mod:`.tables`
(report and verdict), :mod:`.plots`, :mod:`.pipeline` (all of it in order); ``dire demo``
(:mod:`dire_plugin.cli.main`) is its command line.

Kept import-free here: the launcher imports this package (through the patch modules) in every
DiRe run of a demo script. May import every package but ``cli``.
"""
