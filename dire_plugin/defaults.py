"""Default weights, importable without torch (the CLI prints them in ``--help``).

They reproduce the paper's released SRe²L/CIFAR-100 code: ``multiplier · (r_cos·(CD + CDM) +
r_euc·EDM)`` with multiplier 0.1, r_cos 1.0, r_euc 0.01, per-class means summed over classes,
i.e. ``r_c = 0.1·1.0`` and ``r_e = 0.1·0.01``.
"""
DEFAULT_R_C = 0.1
DEFAULT_R_E = 0.001
