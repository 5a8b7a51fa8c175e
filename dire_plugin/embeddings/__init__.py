"""Embeddings: capture of penultimate features, the real-embedding bank, the per-class memory of
synthetic embeddings, and the real-data loaders with their preprocessing specs. May import
``regularizer``, ``io`` and ``errors``."""
