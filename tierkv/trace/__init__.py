"""TKLQT tracer: profiler capture (``capture``), trace analysis (``analyze``), output (``report``).

Only the torch-free analyzer API is re-exported here; ``capture`` imports torch and the engine.
"""

from tierkv.trace.analyze import TraceReport, analyze_trace
from tierkv.trace.events import TraceError
from tierkv.trace.verdict import VerdictRule

__all__ = ["TraceError", "TraceReport", "VerdictRule", "analyze_trace"]
