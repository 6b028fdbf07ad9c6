"""Which backend serves which model name, locally.

Names resolve through ids and aliases. The mesh router consults this for the
local candidates; the API consults it for /v1/models. Model identity
descriptors, collected from the backends off the event loop (``daemon``), are
kept here and shown in every model's details as ``identity`` (the descriptor,
unknown fields None) and ``sha256`` (its file sha256, None when unknown).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .backends.base import Backend, ModelInfo
from .errors import ModelNotFound

if TYPE_CHECKING:
    from .modelid import ModelDescriptor


@dataclass(frozen=True)
class ResolvedModel:
    backend: Backend
    model_id: str


class ModelCatalog:
    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends
        self._identities: dict[tuple[str, str], dict] = {}  # (backend name, model id) -> descriptor dict

    def set_descriptors(self, backend: Backend, descriptors: Iterable[ModelDescriptor]) -> None:
        for descriptor in descriptors:
            self._identities[(backend.name, descriptor.id)] = descriptor.to_dict()

    def identity(self, backend: Backend, model_id: str) -> dict | None:
        return self._identities.get((backend.name, model_id))

    def _with_identity(self, backend: Backend, info: ModelInfo) -> ModelInfo:
        identity = self._identities.get((backend.name, info.id))
        if identity is None:
            return info
        return replace(info, details={**info.details, "identity": identity, "sha256": identity.get("file_sha256")})

    def models(self) -> list[tuple[Backend, ModelInfo]]:
        return [(backend, self._with_identity(backend, info)) for backend in self.backends for info in backend.models()]

    def resolve(self, name: str) -> ResolvedModel:
        for backend in self.backends:
            for info in backend.models():
                if name == info.id or name in info.aliases:
                    return ResolvedModel(backend, info.id)
        raise ModelNotFound(f"The model '{name}' does not exist", param="model")

    def info(self, name: str) -> ModelInfo:
        resolved = self.resolve(name)
        return next(i for b, i in self.models() if b is resolved.backend and i.id == resolved.model_id)


__all__ = ["ModelCatalog", "ResolvedModel"]
