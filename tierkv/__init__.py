"""tierkv: memory-tiered LLM inference. Public API: ``load()``, ``Engine``, ``Budget``."""

from tierkv.config import Budget, ModelConfig, Policy
from tierkv.engine import Engine, GenerationResult, GenerationStats, Piece, Stream, load
from tierkv.numerics import NonFiniteError

__all__ = ["load", "Engine", "Budget", "Policy", "ModelConfig", "GenerationResult", "GenerationStats",
           "Piece", "Stream", "NonFiniteError"]
__version__ = "0.1.0"
