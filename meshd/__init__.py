"""meshd: a peer-to-peer LLM inference mesh daemon.

One asyncio daemon per host serves an OpenAI-compatible API from local
backends or, by policy, from trusted peers.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
