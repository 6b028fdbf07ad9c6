"""Which backend serves which model name, locally.

Names resolve through ids and aliases. The mesh router (later) consults this
for the local candidates; the API consults it for /v1/models.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backends.base import Backend, ModelInfo
from .errors import ModelNotFound


@dataclass(frozen=True)
class ResolvedModel:
    backend: Backend
    model_id: str


class ModelCatalog:
    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends

    def models(self) -> list[tuple[Backend, ModelInfo]]:
        return [(backend, info) for backend in self.backends for info in backend.models()]

    def resolve(self, name: str) -> ResolvedModel:
        for backend, info in self.models():
            if name == info.id or name in info.aliases:
                return ResolvedModel(backend, info.id)
        raise ModelNotFound(f"The model '{name}' does not exist", param="model")

    def info(self, name: str) -> ModelInfo:
        resolved = self.resolve(name)
        return next(i for i in resolved.backend.models() if i.id == resolved.model_id)


__all__ = ["ModelCatalog", "ResolvedModel"]
