"""The quota limiter: exact admission under concurrency, windows, settle/release, Retry-After, headers."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest

from meshd.auth import (
    AdmissionClosed,
    KeyRecord,
    Limits,
    QuotaConfig,
    QuotaLimiter,
    TenantRecord,
    format_duration,
)
from meshd.errors import RateLimited, RequestExceedsLimit

CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
MIDNIGHT = 1_770_076_800.0  # 2026-02-03T00:00:00Z
T0 = MIDNIGHT + 3600.0


def key(key_id: str = "abcdefghijkl", tenant: str = "acme", **limits: int) -> KeyRecord:
    return KeyRecord(key_id=key_id, name=key_id, tenant=tenant, created_at=CREATED, secret_hash="x",
                     limits=Limits(**limits))


def tenant(name: str = "acme", **limits: int) -> TenantRecord:
    return TenantRecord(name, limits=Limits(**limits))


# --- exactness under concurrency --------------------------------------------------------------


async def _burst(limiter: QuotaLimiter, k: KeyRecord, t: TenantRecord, n: int, tokens: int,
                 now: float, seed: int) -> list[bool]:
    """n requests in one event loop: each waits at a barrier, admits, does real awaits, settles."""
    rng = random.Random(seed)
    start = asyncio.Event()

    async def one(i: int) -> bool:
        await start.wait()
        await asyncio.sleep(rng.random() / 1000)
        try:
            admission = limiter.admit(k, t, tokens, now)
        except RateLimited:
            return False
        await asyncio.sleep(rng.random() / 1000)  # "generation"
        limiter.settle(admission, tokens, now)
        return True

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await asyncio.sleep(0)
    start.set()
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize("limit", [1, 7, 25])
async def test_exactly_rpm_requests_pass_when_many_arrive_at_once(limit: int) -> None:
    limiter = QuotaLimiter()
    results = await _burst(limiter, key(rpm=limit), tenant(), 60, 10, T0, seed=limit)
    assert sum(results) == limit


async def test_exactly_as_many_as_fit_in_tpm_pass() -> None:
    limiter = QuotaLimiter()
    results = await _burst(limiter, key(tpm=1000), tenant(), 40, 90, T0, seed=1)
    assert sum(results) == 11  # 11 * 90 = 990 <= 1000 < 12 * 90


async def test_tenant_limit_is_shared_by_its_keys() -> None:
    limiter = QuotaLimiter()
    t = tenant(rpm=10)
    a, b = key("aaaaaaaaaaaa", rpm=8), key("bbbbbbbbbbbb", rpm=8)
    first, second = await asyncio.gather(
        _burst(limiter, a, t, 20, 1, T0, seed=2), _burst(limiter, b, t, 20, 1, T0, seed=3)
    )
    assert sum(first) + sum(second) == 10
    assert sum(first) <= 8 and sum(second) <= 8


# --- sliding minute windows -------------------------------------------------------------------


def test_rpm_window_slides_and_retry_after_is_exact() -> None:
    limiter = QuotaLimiter()
    k, t = key(rpm=2), tenant()
    limiter.admit(k, t, 0, T0)
    limiter.admit(k, t, 0, T0 + 10)
    with pytest.raises(RateLimited) as info:
        limiter.admit(k, t, 0, T0 + 20.25)
    error = info.value
    assert (error.status, error.code, error.limit, error.scope) == (429, "rate_limit_exceeded", "requests", "key")
    assert error.retry_after_ms == 39_750  # the first request leaves the window at T0 + 60
    assert error.retry_after == 40.0  # whole seconds, rounded up
    assert error.headers["retry-after-ms"] == "39750"
    assert "Limit 2, Used 2, Requested 1" in error.message and "39.75s" in error.message
    with pytest.raises(RateLimited):
        limiter.admit(k, t, 0, T0 + 59.999)
    limiter.admit(k, t, 0, T0 + 60)  # exactly when promised
    with pytest.raises(RateLimited) as again:
        limiter.admit(k, t, 0, T0 + 60)
    assert again.value.retry_after_ms == 10_000


def test_tpm_retry_after_waits_for_enough_tokens_to_expire() -> None:
    limiter = QuotaLimiter()
    k, t = key(tpm=1000), tenant()
    for offset, tokens in ((0, 400), (10, 300), (20, 200)):
        limiter.admit(k, t, tokens, T0 + offset)
    with pytest.raises(RateLimited) as info:
        limiter.admit(k, t, 500, T0 + 30)  # 900 + 500 > 1000: 400 must expire, i.e. the first entry
    assert info.value.limit == "tokens" and info.value.retry_after_ms == 30_000
    with pytest.raises(RateLimited) as bigger:
        limiter.admit(k, t, 750, T0 + 30)  # 650 must expire: the first two entries
    assert bigger.value.retry_after_ms == 40_000
    limiter.admit(k, t, 500, T0 + 60)


def test_the_slowest_exhausted_limit_decides_retry_after() -> None:
    limiter = QuotaLimiter()
    k, t = key(rpm=5, tpm=100), tenant(rpm=1)
    limiter.admit(k, t, 100, T0)  # tokens full until T0+60, tenant requests full until T0+60
    with pytest.raises(RateLimited) as info:
        limiter.admit(k, t, 10, T0 + 15)
    assert info.value.retry_after_ms == 45_000
    assert info.value.scope in ("key", "tenant")


def test_request_larger_than_a_token_limit_can_never_pass() -> None:
    limiter = QuotaLimiter()
    with pytest.raises(RequestExceedsLimit) as info:
        limiter.admit(key(tpm=100), tenant(), 101, T0)
    assert info.value.status == 429 and info.value.code == "request_exceeds_limit"
    assert info.value.retry_after is None
    with pytest.raises(RequestExceedsLimit):
        limiter.admit(key(), tenant(tokens_per_day=50), 51, T0)


# --- settle and release -----------------------------------------------------------------------


def test_settle_gives_back_the_unused_reservation() -> None:
    limiter = QuotaLimiter()
    k, t = key(tpm=1000, tokens_per_day=5000), tenant(tpm=2000)
    admission = limiter.admit(k, t, 800, T0)
    assert limiter.usage("key", k.key_id, T0) == (1, 800, 800)
    limiter.settle(admission, 150, T0 + 5)
    assert limiter.usage("key", k.key_id, T0 + 5) == (1, 150, 150)
    assert limiter.usage("tenant", "acme", T0 + 5) == (1, 150, 150)
    assert (admission.state, admission.actual) == ("settled", 150)
    limiter.admit(k, t, 850, T0 + 5)  # fits only because 650 came back


def test_settle_charges_an_overrun() -> None:
    limiter = QuotaLimiter()
    k, t = key(tpm=1000), tenant()
    admission = limiter.admit(k, t, 100, T0)
    limiter.settle(admission, 1100, T0 + 1)
    assert limiter.usage("key", k.key_id, T0 + 1) == (1, 1100, 1100)
    with pytest.raises(RateLimited) as info:
        limiter.admit(k, t, 1, T0 + 2)
    assert info.value.retry_after_ms == 58_000  # the overrun is charged to the admission, at T0


def test_settle_after_the_reservation_left_the_window_charges_only_the_overrun_now() -> None:
    limiter = QuotaLimiter()
    k, t = key(tpm=1000), tenant()
    long_one = limiter.admit(k, t, 100, T0)
    short = limiter.admit(k, t, 100, T0 + 30)
    limiter.settle(long_one, 400, T0 + 70)  # admitted 70 s ago: its entry is gone
    assert limiter.usage("key", k.key_id, T0 + 70) == (1, 100 + 300, 500)
    limiter.settle(short, 50, T0 + 70)
    assert limiter.usage("key", k.key_id, T0 + 70) == (1, 50 + 300, 450)
    gone = limiter.admit(k, t, 100, T0 + 80)
    limiter.settle(gone, 10, T0 + 200)  # under-use after the window: nothing to give back there
    assert limiter.usage("key", k.key_id, T0 + 200)[1] == 0


def test_release_undoes_the_admission_entirely() -> None:
    limiter = QuotaLimiter()
    k, t = key(rpm=1, tpm=500, tokens_per_day=500), tenant(rpm=1)
    admission = limiter.admit(k, t, 500, T0)
    limiter.release(admission, T0 + 1)
    assert limiter.usage("key", k.key_id, T0 + 1) == (0, 0, 0)
    assert limiter.usage("tenant", "acme", T0 + 1) == (0, 0, 0)
    limiter.admit(k, t, 500, T0 + 1)
    limiter.release(admission, T0 + 1)  # idempotent: the second release changes nothing
    assert limiter.usage("key", k.key_id, T0 + 1) == (1, 500, 500)


def test_settle_twice_or_after_release_is_a_caller_bug() -> None:
    limiter = QuotaLimiter()
    k, t = key(), tenant()
    admission = limiter.admit(k, t, 10, T0)
    limiter.settle(admission, 5, T0)
    limiter.release(admission, T0)  # no-op once settled
    assert limiter.usage("key", k.key_id, T0) == (1, 5, 5)
    with pytest.raises(AdmissionClosed):
        limiter.settle(admission, 5, T0)


# --- the daily budget -------------------------------------------------------------------------


def test_daily_budget_resets_at_utc_midnight() -> None:
    limiter = QuotaLimiter()
    k, t = key(tokens_per_day=1000), tenant()
    late = MIDNIGHT + 86400 - 30  # 23:59:30
    limiter.admit(k, t, 900, late)
    with pytest.raises(RateLimited) as info:
        limiter.admit(k, t, 200, late + 0.5)
    assert info.value.limit == "tokens_per_day" and info.value.retry_after_ms == 29_500
    assert "tokens per day (TPD)" in info.value.message
    limiter.admit(k, t, 1000, MIDNIGHT + 86400)


def test_settle_across_midnight_keeps_yesterday_and_charges_the_overrun_today() -> None:
    limiter = QuotaLimiter()
    k, t = key(), tenant()
    under = limiter.admit(k, t, 500, MIDNIGHT - 5)
    over = limiter.admit(k, t, 100, MIDNIGHT - 5)
    limiter.settle(under, 100, MIDNIGHT + 5)
    limiter.settle(over, 350, MIDNIGHT + 5)
    assert limiter.usage("key", k.key_id, MIDNIGHT + 5)[2] == 250


# --- headers -----------------------------------------------------------------------------------


def test_headers_report_the_binding_limit() -> None:
    limiter = QuotaLimiter()
    k, t = key(rpm=3, tpm=1000, tokens_per_day=10_000), tenant(rpm=100, tpm=400)
    admission = limiter.admit(k, t, 100, T0)
    assert admission.status.headers() == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "400",  # the tenant's TPM binds: 300 left, not the key's 900
        "x-ratelimit-remaining-tokens": "300",
        "x-ratelimit-reset-tokens": "1m0s",
        "x-ratelimit-limit-tokens-day": "10000",
        "x-ratelimit-remaining-tokens-day": "9900",
        "x-ratelimit-reset-tokens-day": "23h0m0s",
    }
    later = limiter.status(k, t, T0 + 15.5).headers()
    assert later["x-ratelimit-reset-requests"] == "44.5s"
    assert later["x-ratelimit-remaining-requests"] == "2"
    assert limiter.status(k, t, T0 + 60).headers()["x-ratelimit-remaining-requests"] == "3"
    assert limiter.status(k, t, T0 + 60).headers()["x-ratelimit-reset-requests"] == "0s"


def test_unlimited_kinds_have_no_headers() -> None:
    limiter = QuotaLimiter()
    admission = limiter.admit(key(rpm=10), tenant(), 5, T0)
    assert set(admission.status.headers()) == {
        "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}
    assert limiter.admit(key("zzzzzzzzzzzz"), tenant(), 5, T0).status.headers() == {}


def test_rate_limited_error_carries_the_headers() -> None:
    limiter = QuotaLimiter()
    k, t = key(rpm=1), tenant()
    limiter.admit(k, t, 0, T0)
    with pytest.raises(RateLimited) as info:
        limiter.admit(k, t, 0, T0 + 1)
    assert info.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert info.value.headers["x-ratelimit-reset-requests"] == "59s"


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.0001, "1ms"), (0.017, "17ms"), (0.999, "999ms"), (1, "1s"), (1.5, "1.5s"),
    (8.64, "8.64s"), (59.9999, "1m0s"), (60, "1m0s"), (360, "6m0s"), (3600, "1h0m0s"), (3723.25, "1h2m3.25s"),
])
def test_format_duration_matches_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- bookkeeping -----------------------------------------------------------------------------


def test_reservation_from_max_tokens_or_the_default() -> None:
    config = QuotaConfig(default_max_tokens=256)
    assert config.reservation(40, 100) == 140
    assert config.reservation(40, None) == 296
    assert config.reservation(40, None, generates=False) == 40
    with pytest.raises(ValueError):
        config.reservation(-1, None)


def test_sweep_forgets_idle_scopes_but_not_open_admissions() -> None:
    limiter = QuotaLimiter()
    k, t = key(), tenant()
    open_one = limiter.admit(k, t, 10, MIDNIGHT - 100)
    limiter.release(limiter.admit(key("zzzzzzzzzzzz"), t, 10, MIDNIGHT - 100), MIDNIGHT - 100)
    assert limiter.sweep(MIDNIGHT + 1) == 1  # only the released key's scope: nothing left in any window
    limiter.settle(open_one, 20, MIDNIGHT + 1)
    assert limiter.usage("key", k.key_id, MIDNIGHT + 1) == (0, 10, 10)  # the overrun landed in a live scope
    assert limiter.sweep(MIDNIGHT + 86400 + 61) == 2
    assert len(limiter) == 0


def test_limits_changed_in_the_record_apply_to_usage_already_recorded() -> None:
    limiter = QuotaLimiter()
    for i in range(5):
        limiter.admit(key(), tenant(), 0, T0 + i)
    with pytest.raises(RateLimited):
        limiter.admit(key(rpm=5), tenant(), 0, T0 + 10)
