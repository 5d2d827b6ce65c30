"""Latents that answer questions: bundle embeddings, along-tract profiles, cohort tables,
similarity and normative deviation scores (torch-free; see docs/analysis.md)."""

from .embedding import EMBEDDING_VERSION, distance, embedding, features, profile, registration_features
from .records import AnalysisError, LatentsRecord, iter_records

__all__ = ["EMBEDDING_VERSION", "AnalysisError", "LatentsRecord", "distance", "embedding", "features",
           "iter_records", "profile", "registration_features"]
