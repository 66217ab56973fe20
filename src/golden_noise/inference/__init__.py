"""Stages 4-5: golden noise for a pipeline (`api`), the batch runner (`batch`) and the single-prompt runner (`single`)."""
from .api import GoldenNoise, load_rnn_export, oracle_noise

__all__ = ["GoldenNoise", "load_rnn_export", "oracle_noise"]
