"""The upstream codebases: ``upstream.lock`` and AST fingerprints, checkout inspection, the CPU
shim, and ``--verify --smoke`` runs. May import ``hooks`` and everything below it."""
