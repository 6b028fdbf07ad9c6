"""HTTP surfaces: the OpenAI-compatible API and its metrics."""

from .app import ApiServer, NodeFacts, error_response
from .metrics import ApiMetrics

__all__ = ["ApiMetrics", "ApiServer", "NodeFacts", "error_response"]
