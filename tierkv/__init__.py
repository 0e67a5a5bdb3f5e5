"""tierkv: memory-tiered LLM inference. Public API: ``load()``, ``Engine``, ``Budget``, and the errors a
user can fix (all subclasses of ``TierkvError``, itself a ``ValueError``)."""

from tierkv.cpu_memory import bound_onednn_cache

bound_onednn_cache()        # before any CPU matrix product: oneDNN reads it once (tierkv.cpu_memory)

from tierkv.version import __version__  # noqa: E402
from tierkv.config import Budget, ConfigError, ModelConfig, Policy
from tierkv.engine import Engine, GenerationResult, GenerationStats, Piece, Stream, load
from tierkv.errors import ArgumentError, TierkvError
from tierkv.io.buffers import PinningError
from tierkv.io.checkpoint import CheckpointError
from tierkv.io.kvstore import KVStoreError
from tierkv.io.store import StoreError
from tierkv.io.tiers import TierFullError
from tierkv.numerics import NonFiniteError
from tierkv.pipeline.kv.table import KVBudgetError
from tierkv.plan import PlanError
from tierkv.session import Session
from tierkv.session_file import SessionError

__all__ = ["load", "Engine", "Budget", "Policy", "ModelConfig", "GenerationResult", "GenerationStats",
           "Piece", "Stream", "TierkvError", "ArgumentError", "ConfigError", "CheckpointError", "PlanError",
           "StoreError", "KVBudgetError", "KVStoreError", "TierFullError", "PinningError",
           "NonFiniteError", "Session", "SessionError", "__version__"]
