"""Benchmarks of speed and memory across sequence lengths (``tokenmix bench``)."""

from .runner import PASSES, bench, ratios

__all__ = ["PASSES", "bench", "ratios"]
