"""Redundancy analysis: how similar are the layers' Q, K, V and attention maps, and where could a region start?"""

from epas_lightning.analysis.analyze import analyze_model
from epas_lightning.analysis.capture import Activations, attention_probs, capture_activations
from epas_lightning.analysis.report import Recommendation, RedundancyReport, RegionScore
from epas_lightning.analysis.similarity import linear_cka, mean_cosine, similarity_matrix

__all__ = [
    "Activations",
    "Recommendation",
    "RedundancyReport",
    "RegionScore",
    "analyze_model",
    "attention_probs",
    "capture_activations",
    "linear_cka",
    "mean_cosine",
    "similarity_matrix",
]
