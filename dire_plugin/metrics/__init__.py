"""Diversity metrics of distilled sets: Coverage, Vendi score, intra-class cosine (:mod:`.diversity`,
re-exported here), the feature extractors, readers of distilled sets, reports and plots. May
import ``embeddings``, ``regularizer``, ``io`` and ``errors``."""
from .diversity import coverage, intra_class_cosine, vendi_score, vendi_score_per_class

__all__ = ["coverage", "intra_class_cosine", "vendi_score", "vendi_score_per_class"]
