"""Per-request authorization: may this key (and its tenant) use this model at this data class?

Pure functions over records; the HTTP layer calls ``authorize`` after
``KeyStore.authenticate`` and before quota admission, so a refused request
never uses quota.

Data class: a request may declare its class (header ``x-meshd-data-class``).
The ceiling is the lower of the key's and the tenant's ``max_data_class``. A
declared class above the ceiling is refused (403 ``data_class_not_allowed``);
an undeclared one gets the configured default, lowered to the ceiling: the
operator, by capping the key, has said its traffic is at most that sensitive.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import DataClassNotAllowed, InvalidRequest, ModelNotAllowed
from .errors import InvalidKeySpec
from .model import DataClass, KeyRecord, TenantRecord, lowest

DATA_CLASS_HEADER = "x-meshd-data-class"


@dataclass(frozen=True, slots=True)
class Authorization:
    """What a request was allowed to do; the input of quota admission and of the verdict."""

    key_id: str
    tenant: str
    model: str
    data_class: DataClass


def data_class_ceiling(key: KeyRecord, tenant: TenantRecord) -> DataClass:
    return lowest(key.max_data_class, tenant.max_data_class)


def model_allowed(key: KeyRecord, tenant: TenantRecord, *names: str) -> bool:
    """Both the key's and the tenant's allow-lists must admit one of the names (id or alias)."""
    return key.allows_model(*names) and tenant.allows_model(*names)


def visible_models(key: KeyRecord, tenant: TenantRecord, models: Iterable[tuple[str, ...]]) -> list[str]:
    """For ``/v1/models``: the first name of each (id, *aliases) group this key may use."""
    return [names[0] for names in models if names and model_allowed(key, tenant, *names)]


def parse_data_class(value: str | None) -> DataClass | None:
    """The request's declared data class from a header value; ``InvalidRequest`` if unknown."""
    if value is None or not value.strip():
        return None
    try:
        return DataClass.parse(value)
    except InvalidKeySpec as exc:
        raise InvalidRequest(exc.message, param=DATA_CLASS_HEADER) from None


def authorize(
    key: KeyRecord,
    tenant: TenantRecord,
    *,
    model: str,
    aliases: tuple[str, ...] = (),
    requested: DataClass | None,
    default: DataClass,
) -> Authorization:
    """Check the model allow-lists and the data class; raise ``ModelNotAllowed`` / ``DataClassNotAllowed``.

    ``model`` is the name the client asked for; ``aliases`` are the other
    names of the same model (its canonical id among them), any of which may
    appear in an allow-list.
    """
    if key.tenant != tenant.name:
        # A caller bug, not a client error: the limits and lists would be the wrong tenant's.
        raise ValueError(f"key {key.key_id} belongs to tenant {key.tenant!r}, not {tenant.name!r}")
    if not model_allowed(key, tenant, model, *aliases):
        whose = "API key" if not key.allows_model(model, *aliases) else "tenant of this API key"
        raise ModelNotAllowed(f"The {whose} is not allowed to use the model '{model}'.", param="model")
    ceiling = data_class_ceiling(key, tenant)
    if requested is not None and not requested.at_most(ceiling):
        raise DataClassNotAllowed(
            f"This API key may send data up to class '{ceiling.value}', but the request is '{requested.value}'.",
            param=DATA_CLASS_HEADER,
        )
    data_class = requested if requested is not None else lowest(default, ceiling)
    return Authorization(key_id=key.key_id, tenant=tenant.name, model=model, data_class=data_class)


__all__ = [
    "DATA_CLASS_HEADER",
    "Authorization",
    "authorize",
    "data_class_ceiling",
    "model_allowed",
    "parse_data_class",
    "visible_models",
]
