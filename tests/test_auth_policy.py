"""Authorization: model allow-lists of keys and tenants, data class ceilings."""

from __future__ import annotations

import datetime as dt

import pytest

from meshd.auth import (
    DataClass,
    KeyRecord,
    TenantRecord,
    authorize,
    data_class_ceiling,
    parse_data_class,
    visible_models,
)
from meshd.errors import DataClassNotAllowed, InvalidRequest, ModelNotAllowed

CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def key(models: tuple[str, ...] | None = None, max_class: DataClass = DataClass.SECRET,
        tenant: str = "acme") -> KeyRecord:
    return KeyRecord(key_id="abcdefghijkl", name="k", tenant=tenant, created_at=CREATED, secret_hash="x",
                     models=models, max_data_class=max_class)


def test_no_allow_list_allows_every_model() -> None:
    grant = authorize(key(), TenantRecord("acme"), model="anything", requested=None, default=DataClass.INTERNAL)
    assert (grant.key_id, grant.tenant, grant.model) == ("abcdefghijkl", "acme", "anything")


def test_key_allow_list_with_exact_ids_and_globs() -> None:
    k = key(models=("smollm2", "llama-3*"))
    tenant = TenantRecord("acme")
    for allowed in ("smollm2", "llama-3", "llama-3.1-8b"):
        authorize(k, tenant, model=allowed, requested=None, default=DataClass.INTERNAL)
    for refused in ("SmolLM2", "smollm2-360m", "llama-2", "mistral"):
        with pytest.raises(ModelNotAllowed) as info:
            authorize(k, tenant, model=refused, requested=None, default=DataClass.INTERNAL)
        assert info.value.status == 403 and info.value.code == "model_not_allowed" and info.value.param == "model"


def test_an_alias_in_the_allow_list_admits_the_model_by_any_name() -> None:
    k = key(models=("smollm2-135m-instruct",))
    authorize(k, TenantRecord("acme"), model="smollm2", aliases=("smollm2-135m-instruct",),
              requested=None, default=DataClass.INTERNAL)


def test_tenant_allow_list_also_applies() -> None:
    tenant = TenantRecord("acme", models=("smollm2",))
    with pytest.raises(ModelNotAllowed, match="tenant"):
        authorize(key(models=("smollm2", "mistral")), tenant, model="mistral", requested=None,
                  default=DataClass.INTERNAL)
    authorize(key(models=("smollm2", "mistral")), tenant, model="smollm2", requested=None, default=DataClass.INTERNAL)


def test_visible_models_filters_the_listing() -> None:
    k = key(models=("a", "c*"))
    groups = [("a", "alias-a"), ("b",), ("c1",), ("x", "c-alias")]
    assert visible_models(k, TenantRecord("acme"), groups) == ["a", "c1", "x"]


def test_data_class_ceiling_is_the_lower_of_key_and_tenant() -> None:
    k = key(max_class=DataClass.CONFIDENTIAL)
    tenant = TenantRecord("acme", max_data_class=DataClass.INTERNAL)
    assert data_class_ceiling(k, tenant) is DataClass.INTERNAL
    assert authorize(k, tenant, model="m", requested=DataClass.PUBLIC, default=DataClass.SECRET).data_class \
        is DataClass.PUBLIC
    with pytest.raises(DataClassNotAllowed) as info:
        authorize(k, tenant, model="m", requested=DataClass.CONFIDENTIAL, default=DataClass.PUBLIC)
    assert info.value.status == 403 and info.value.code == "data_class_not_allowed"


def test_undeclared_data_class_gets_the_default_lowered_to_the_ceiling() -> None:
    tenant = TenantRecord("acme")
    assert authorize(key(), tenant, model="m", requested=None, default=DataClass.INTERNAL).data_class \
        is DataClass.INTERNAL
    assert authorize(key(max_class=DataClass.PUBLIC), tenant, model="m", requested=None,
                     default=DataClass.INTERNAL).data_class is DataClass.PUBLIC


def test_data_class_order_and_parsing() -> None:
    order = [DataClass.parse(t) for t in ("public", "Internal", " confidential ", "SECRET")]
    assert [c.rank for c in order] == [0, 1, 2, 3]
    assert DataClass.INTERNAL.at_most(DataClass.CONFIDENTIAL) and not DataClass.SECRET.at_most(DataClass.INTERNAL)
    assert parse_data_class(None) is None and parse_data_class(" ") is None
    with pytest.raises(InvalidRequest) as info:
        parse_data_class("top-secret")
    assert info.value.status == 400 and info.value.param == "x-meshd-data-class"


def test_a_mismatched_tenant_record_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        authorize(key(tenant="acme"), TenantRecord("other"), model="m", requested=None, default=DataClass.PUBLIC)
