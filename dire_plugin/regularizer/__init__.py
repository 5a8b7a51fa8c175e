"""The math of DiRe: pairwise kernels, per-class packing, the functional terms, ``DiReLoss`` and
the default weights. Imports torch and ``dire_plugin.errors`` only."""
