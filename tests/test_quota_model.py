"""The limiter against a brute-force reference model, on random traffic (hypothesis).

The reference keeps every charge in plain lists and recomputes usage from
scratch on each step; Retry-After is checked by searching for the earliest
moment at which the same request would be admitted.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.auth import KeyRecord, Limits, QuotaLimiter, TenantRecord
from meshd.auth.quota import ceil_ms
from meshd.errors import RateLimited, RequestExceedsLimit

WINDOW, DAY = 60.0, 86400.0
MIDNIGHT = 1_770_076_800.0
CREATED = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@dataclass
class _Charge:
    time: float
    reserved: int
    request_live: bool = True
    token_amount: int = 0
    day: int = 0


@dataclass
class Reference:
    rpm: int
    tpm: int
    tpd: int
    charges: list[_Charge] = field(default_factory=list)
    extra_tokens: list[tuple[float, int]] = field(default_factory=list)  # overruns charged at settle time
    day_used: dict[int, int] = field(default_factory=dict)

    def usage(self, now: float) -> tuple[int, int, int]:
        requests = sum(1 for c in self.charges if c.request_live and c.time + WINDOW > now)
        tokens = sum(c.token_amount for c in self.charges if c.time + WINDOW > now)
        tokens += sum(a for t, a in self.extra_tokens if t + WINDOW > now)
        return requests, tokens, self.day_used.get(int(now // DAY), 0)

    def admits(self, tokens: int, now: float) -> bool:
        requests, used, today = self.usage(now)
        return (requests + 1 <= self.rpm
                and (tokens == 0 or used + tokens <= self.tpm)
                and (tokens == 0 or today + tokens <= self.tpd))

    def earliest_admission(self, tokens: int, now: float) -> float:
        """Brute force: usage only drops when an entry leaves its window or a day ends."""
        moments = {c.time + WINDOW for c in self.charges} | {t + WINDOW for t, _ in self.extra_tokens}
        moments.add((now // DAY + 1) * DAY)
        for moment in sorted(m for m in moments if m > now):
            if self.admits(tokens, moment):
                return moment
        raise AssertionError("never admitted")

    def admit(self, tokens: int, now: float) -> _Charge:
        charge = _Charge(now, tokens, token_amount=tokens, day=int(now // DAY))
        self.charges.append(charge)
        self.day_used[charge.day] = self.day_used.get(charge.day, 0) + tokens
        return charge

    def settle(self, charge: _Charge, actual: int, now: float) -> None:
        delta = actual - charge.reserved
        if charge.time + WINDOW > now:
            charge.token_amount = actual
        elif delta > 0:
            self.extra_tokens.append((now, delta))
        today = int(now // DAY)
        if today == charge.day:
            self.day_used[today] += delta
        elif delta > 0:
            self.day_used[today] = self.day_used.get(today, 0) + delta

    def release(self, charge: _Charge, now: float) -> None:
        if charge.time + WINDOW > now:
            charge.request_live = False
            charge.token_amount = 0
        if int(now // DAY) == charge.day:
            self.day_used[charge.day] -= charge.reserved


operations = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.integers(0, 20_000) | st.integers(55_000, 65_000)),  # milliseconds
        st.tuples(st.just("admit"), st.integers(0, 400)),
        st.tuples(st.just("settle"), st.integers(0, 500)),
        st.tuples(st.just("release"), st.integers(0, 0)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=250, deadline=None)
@given(
    ops=operations,
    rpm=st.integers(1, 8),
    tpm=st.integers(1, 1500),
    tpd=st.integers(1, 4000),
    start=st.integers(0, 300_000),
    pick=st.randoms(use_true_random=False),
)
def test_limiter_matches_the_reference(ops: list[tuple[str, int]], rpm: int, tpm: int, tpd: int,
                                       start: int, pick) -> None:
    key = KeyRecord(key_id="abcdefghijkl", name="k", tenant="t", created_at=CREATED, secret_hash="x",
                    limits=Limits(rpm=rpm, tpm=tpm, tokens_per_day=tpd))
    tenant = TenantRecord("t")
    limiter, reference = QuotaLimiter(), Reference(rpm, tpm, tpd)
    now = MIDNIGHT - 150 + start / 1000  # start near midnight so days roll over
    open_admissions: list[tuple[object, _Charge]] = []
    for op, value in ops:
        if op == "wait":
            now += value / 1000
        elif op == "admit":
            if value > tpm or value > tpd:
                try:
                    limiter.admit(key, tenant, value, now)
                except RequestExceedsLimit:
                    continue
                raise AssertionError("a request above a token limit was admitted")
            expected = reference.admits(value, now)
            before = copy.deepcopy(limiter)
            try:
                admission = limiter.admit(key, tenant, value, now)
            except RateLimited as error:
                assert not expected, "the limiter refused what the reference admits"
                earliest = reference.earliest_admission(value, now)
                assert error.retry_after_ms == max(1, ceil_ms(earliest - now))
                # Retrying at the promised time succeeds (nothing else happened meanwhile).
                before.admit(key, tenant, value, now + error.retry_after_ms / 1000)
                continue
            assert expected, "the limiter admitted what the reference refuses"
            open_admissions.append((admission, reference.admit(value, now)))
        elif open_admissions:
            admission, charge = open_admissions.pop(pick.randrange(len(open_admissions)))
            if op == "settle":
                limiter.settle(admission, value, now)
                reference.settle(charge, value, now)
            else:
                limiter.release(admission, now)
                reference.release(charge, now)
        assert limiter.usage("key", key.key_id, now) == reference.usage(now)


@settings(max_examples=150, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(0, 20_000), st.integers(1, 300)), min_size=1, max_size=80),
    tpm=st.integers(300, 2000),
    rpm=st.integers(1, 30),
)
def test_no_sixty_second_span_exceeds_the_limits_without_overruns(arrivals: list[tuple[int, int]], tpm: int,
                                                                  rpm: int) -> None:
    key = KeyRecord(key_id="abcdefghijkl", name="k", tenant="t", created_at=CREATED, secret_hash="x",
                    limits=Limits(rpm=rpm, tpm=tpm))
    limiter, now, admitted = QuotaLimiter(), 1_770_000_000.0, []
    for gap_ms, tokens in arrivals:
        now += gap_ms / 1000
        try:
            admission = limiter.admit(key, TenantRecord("t"), tokens, now)
        except RateLimited:
            continue
        limiter.settle(admission, tokens // 2, now)  # under-use only
        admitted.append((now, tokens // 2))
    for start, _ in admitted:
        span = [t for t in admitted if start <= t[0] < start + WINDOW]
        assert len(span) <= rpm
        assert sum(tokens for _, tokens in span) <= tpm
