"""Tools for choosing and tuning a method: relevance scores and WiSE-FT interpolation."""

from peftkit.analysis.interpolate import interpolate
from peftkit.analysis.relevance import ModuleScore, RelevanceReport, relevance_scores

__all__ = ["ModuleScore", "RelevanceReport", "interpolate", "relevance_scores"]
