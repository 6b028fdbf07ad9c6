"""The quota limiter: requests and tokens per minute, tokens per day, per key and per tenant.

Sans-IO and synchronous: time comes in as ``now`` (seconds since the epoch,
``time.time()``), nothing awaits, so an ``admit`` call is atomic on the event
loop and N concurrent requests against a limit of L admit exactly L.

Windows (docs/auth.md, "Quotas"):

- ``rpm`` and ``tpm`` are **sliding 60-second windows** kept as exact logs:
  an admission at time t counts during [t, t + 60). No burst at a window
  boundary, and the wait until enough has expired is computed exactly.
- ``tokens_per_day`` is a **fixed UTC calendar day** budget: it resets at
  00:00 UTC, so the wait is exactly the time to midnight.

Tokens are reserved at admission (prompt estimate plus ``max_tokens``, or a
default when absent), then ``settle`` replaces the reservation with the real
count: the unused part is given back, an overrun is charged. A reservation
that has already slid out of its minute window can no longer be adjusted
there, so only an overrun is charged, at settle time. ``release`` undoes an
admission entirely (the request failed before doing work); a request that
produced some tokens and then failed should be settled with what it used.

Quotas are accounted at the entry node only: a peer that serves a forwarded
request trusts the entry node's signed verdict and does not call ``admit``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import RateLimited, RequestExceedsLimit
from .errors import AdmissionClosed
from .model import KeyRecord, Limits, TenantRecord

WINDOW = 60.0
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """How large a reservation is when the request does not say (``max_tokens`` absent)."""

    default_max_tokens: int = 1024

    def __post_init__(self) -> None:
        if type(self.default_max_tokens) is not int or self.default_max_tokens < 0:
            raise ValueError("default_max_tokens must be a non-negative integer")

    def reservation(self, prompt_tokens: int, max_tokens: int | None, *, generates: bool = True) -> int:
        """Tokens to reserve: the prompt estimate plus what the request may generate.

        ``generates=False`` for embeddings, which produce no completion tokens.
        """
        if prompt_tokens < 0 or (max_tokens is not None and max_tokens < 0):
            raise ValueError("token counts cannot be negative")
        if not generates:
            return prompt_tokens
        return prompt_tokens + (self.default_max_tokens if max_tokens is None else max_tokens)


# --- windows --------------------------------------------------------------------------------


class _Entry:
    __slots__ = ("amount", "live", "time")

    def __init__(self, time: float, amount: int) -> None:
        self.time = time
        self.amount = amount
        self.live = True


class _Window:
    """A sliding window log: the entries admitted in the last ``WINDOW`` seconds and their sum."""

    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.total = 0

    def prune(self, now: float) -> None:
        entries = self.entries
        while entries and entries[0].time + WINDOW <= now:
            entry = entries.popleft()
            entry.live = False
            self.total -= entry.amount

    def add(self, now: float, amount: int) -> _Entry:
        entry = _Entry(now, amount)
        self.entries.append(entry)
        self.total += amount
        return entry

    def set_amount(self, entry: _Entry, amount: int) -> None:
        self.total += amount - entry.amount
        entry.amount = amount

    def wait_for(self, excess: int, now: float) -> float:
        """Seconds until at least ``excess`` has left the window (the caller checked it can)."""
        freed = 0
        for entry in self.entries:
            freed += entry.amount
            if freed >= excess:
                return max(0.0, entry.time + WINDOW - now)
        return WINDOW

    def reset_in(self, now: float) -> float:
        """Seconds until nothing counts any more (OpenAI's "resets to its initial state")."""
        for entry in reversed(self.entries):
            if entry.amount > 0:
                return max(0.0, entry.time + WINDOW - now)
        return 0.0


class _Day:
    """Tokens used in the current UTC day."""

    __slots__ = ("day", "used")

    def __init__(self) -> None:
        self.day = -1
        self.used = 0

    def roll(self, now: float) -> int:
        day = int(now // DAY)
        if day != self.day:
            self.day, self.used = day, 0
        return day


def _until_midnight(now: float) -> float:
    return (math.floor(now / DAY) + 1) * DAY - now


class _Scope:
    """Usage of one key or one tenant."""

    __slots__ = ("day", "name", "pending", "requests", "tokens")

    def __init__(self, name: str) -> None:
        self.name = name  # "key abc..." / "tenant acme", for messages
        self.requests = _Window()
        self.tokens = _Window()
        self.day = _Day()
        self.pending = 0  # admissions not yet settled or released: never forget such a scope

    def prune(self, now: float) -> None:
        self.requests.prune(now)
        self.tokens.prune(now)
        self.day.roll(now)

    def idle(self, now: float) -> bool:
        self.prune(now)
        return not (self.pending or self.requests.entries or self.tokens.entries or self.day.used)


# --- status and headers ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """One limit as the client should see it: its size, what is left, and when it is whole again."""

    limit: int
    remaining: int
    reset: float  # seconds


@dataclass(frozen=True, slots=True)
class RateLimitStatus:
    """The binding (least remaining) limit of each kind across the key and its tenant; None = unlimited."""

    requests: LimitStatus | None = None
    tokens: LimitStatus | None = None
    tokens_per_day: LimitStatus | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers (``-tokens`` is the per-minute limit), plus
        ``x-ratelimit-*-tokens-day`` for the daily budget. Unlimited kinds are left out."""
        out: dict[str, str] = {}
        for suffix, status in (("requests", self.requests), ("tokens", self.tokens),
                               ("tokens-day", self.tokens_per_day)):
            if status is not None:
                out[f"x-ratelimit-limit-{suffix}"] = str(status.limit)
                out[f"x-ratelimit-remaining-{suffix}"] = str(status.remaining)
                out[f"x-ratelimit-reset-{suffix}"] = format_duration(status.reset)
        return out


def ceil_ms(seconds: float) -> int:
    """Whole milliseconds, rounded up, so that waiting that long is always long enough."""
    return max(0, math.ceil(round(seconds * 1000, 6)))


def format_duration(seconds: float) -> str:
    """A duration the way OpenAI (Go) writes it: ``17ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``.

    Rounded up to the millisecond.
    """
    ms = ceil_ms(seconds)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    text = f"{whole}.{frac:03d}".rstrip("0") + "s" if frac else f"{whole}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


# --- the limiter ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Charge:
    scope: _Scope
    request: _Entry
    tokens: _Entry
    day: int


class Admission:
    """A request let in: what it reserved, where, and the limits as they stood after it."""

    __slots__ = ("_charges", "actual", "admitted_at", "key_id", "reserved", "state", "status", "tenant")

    def __init__(self, key_id: str, tenant: str, reserved: int, admitted_at: float,
                 charges: list[_Charge], status: RateLimitStatus) -> None:
        self.key_id = key_id
        self.tenant = tenant
        self.reserved = reserved
        self.admitted_at = admitted_at
        self.status = status
        self.actual: int | None = None
        self.state = "reserved"  # -> "settled" | "released"
        self._charges = charges

    def __repr__(self) -> str:
        return (f"Admission(key_id={self.key_id!r}, tenant={self.tenant!r}, reserved={self.reserved}, "
                f"state={self.state!r})")


@dataclass(frozen=True, slots=True)
class _Refusal:
    limit: str
    scope: _Scope
    limit_value: int
    used: int
    wait: float


_LIMIT_LABELS = {
    "requests": "requests per min (RPM)",
    "tokens": "tokens per min (TPM)",
    "tokens_per_day": "tokens per day (TPD)",
}


class QuotaLimiter:
    """Admits, settles and releases requests against the limits in key and tenant records.

    Limits are read from the records on every call, so a limit changed in the
    key file applies to the next request, against the usage already recorded.
    Usage is recorded whether or not a limit is set. Use from one thread.
    """

    def __init__(self) -> None:
        self._scopes: dict[tuple[str, str], _Scope] = {}

    def _scope(self, kind: str, name: str) -> _Scope:
        scope = self._scopes.get((kind, name))
        if scope is None:
            scope = self._scopes[(kind, name)] = _Scope(f"{kind} {name}")
        return scope

    def _pairs(self, key: KeyRecord, tenant: TenantRecord) -> Iterator[tuple[str, _Scope, Limits]]:
        if key.tenant != tenant.name:
            raise ValueError(f"key {key.key_id} belongs to tenant {key.tenant!r}, not {tenant.name!r}")
        yield "key", self._scope("key", key.key_id), key.limits
        yield "tenant", self._scope("tenant", tenant.name), tenant.limits

    def admit(self, key: KeyRecord, tenant: TenantRecord, estimated_tokens: int, now: float) -> Admission:
        """Let a request in and reserve ``estimated_tokens``, or raise ``RateLimited``.

        ``RateLimited.retry_after`` is the exact wait (rounded up to a whole
        second; ``retry_after_ms`` to the millisecond) until every exhausted
        limit would admit this request, if nothing else happens meanwhile.
        ``RequestExceedsLimit`` when the estimate alone is above a token limit.
        """
        if type(estimated_tokens) is not int or estimated_tokens < 0:
            raise ValueError(f"estimated_tokens must be a non-negative integer, got {estimated_tokens!r}")
        pairs = list(self._pairs(key, tenant))
        refusals: list[_Refusal] = []
        for _, scope, limits in pairs:
            scope.prune(now)
            for limit, value in (("tokens", limits.tpm), ("tokens_per_day", limits.tokens_per_day)):
                if value is not None and estimated_tokens > value:
                    raise RequestExceedsLimit(
                        f"Request too large for {scope.name} on {_LIMIT_LABELS[limit]}: Limit {value}, "
                        f"Requested {estimated_tokens}. Lower max_tokens or the prompt size.",
                        limit=limit, scope=scope.name.split()[0], retry_after=None,
                        headers=self.status(key, tenant, now).headers(),
                    )
            refusals.extend(self._check(scope, limits, estimated_tokens, now))
        if refusals:
            raise self._refuse(refusals, key, tenant, estimated_tokens, now)
        charges = [
            _Charge(scope, scope.requests.add(now, 1), scope.tokens.add(now, estimated_tokens), scope.day.day)
            for _, scope, _ in pairs
        ]
        for charge in charges:
            charge.scope.day.used += estimated_tokens
            charge.scope.pending += 1
        return Admission(key.key_id, tenant.name, estimated_tokens, now, charges, self.status(key, tenant, now))

    @staticmethod
    def _check(scope: _Scope, limits: Limits, tokens: int, now: float) -> Iterator[_Refusal]:
        if limits.rpm is not None and scope.requests.total + 1 > limits.rpm:
            excess = scope.requests.total + 1 - limits.rpm
            yield _Refusal("requests", scope, limits.rpm, scope.requests.total, scope.requests.wait_for(excess, now))
        if limits.tpm is not None and tokens > 0 and scope.tokens.total + tokens > limits.tpm:
            excess = scope.tokens.total + tokens - limits.tpm
            yield _Refusal("tokens", scope, limits.tpm, scope.tokens.total, scope.tokens.wait_for(excess, now))
        if limits.tokens_per_day is not None and tokens > 0 and scope.day.used + tokens > limits.tokens_per_day:
            yield _Refusal("tokens_per_day", scope, limits.tokens_per_day, scope.day.used, _until_midnight(now))

    def _refuse(self, refusals: list[_Refusal], key: KeyRecord, tenant: TenantRecord, tokens: int,
                now: float) -> RateLimited:
        # Every exhausted limit must recover before the request fits: report the slowest.
        worst = max(refusals, key=lambda r: r.wait)
        wait_ms = max(1, ceil_ms(worst.wait))
        requested = 1 if worst.limit == "requests" else tokens
        headers = self.status(key, tenant, now).headers()
        headers["retry-after-ms"] = str(wait_ms)
        return RateLimited(
            f"Rate limit reached for {worst.scope.name} on {_LIMIT_LABELS[worst.limit]}: Limit {worst.limit_value}, "
            f"Used {worst.used}, Requested {requested}. Please try again in {format_duration(wait_ms / 1000)}.",
            limit=worst.limit,
            scope=worst.scope.name.split()[0],
            retry_after=float(math.ceil(wait_ms / 1000)),
            retry_after_ms=wait_ms,
            headers=headers,
        )

    def settle(self, admission: Admission, actual_tokens: int, now: float) -> None:
        """Replace the reservation with the real token count (give back the rest, charge an overrun)."""
        if admission.state != "reserved":
            raise AdmissionClosed(f"admission for key {admission.key_id} is already {admission.state}")
        if type(actual_tokens) is not int or actual_tokens < 0:
            raise ValueError(f"actual_tokens must be a non-negative integer, got {actual_tokens!r}")
        delta = actual_tokens - admission.reserved
        for charge in admission._charges:
            scope = charge.scope
            scope.prune(now)
            if charge.tokens.live:
                scope.tokens.set_amount(charge.tokens, actual_tokens)
            elif delta > 0:
                scope.tokens.add(now, delta)
            # Yesterday's reservation cannot be given back to today's budget; an overrun is still charged.
            if scope.day.day == charge.day or delta > 0:
                scope.day.used += delta
            scope.pending -= 1
        admission.actual = actual_tokens
        admission.state = "settled"

    def release(self, admission: Admission, now: float) -> None:
        """Undo an admission (the request failed before doing work). Idempotent; no-op once settled."""
        if admission.state != "reserved":
            return
        for charge in admission._charges:
            scope = charge.scope
            scope.prune(now)
            if charge.request.live:
                scope.requests.set_amount(charge.request, 0)
            if charge.tokens.live:
                scope.tokens.set_amount(charge.tokens, 0)
            if scope.day.day == charge.day:
                scope.day.used -= admission.reserved
            scope.pending -= 1
        admission.state = "released"

    def status(self, key: KeyRecord, tenant: TenantRecord, now: float) -> RateLimitStatus:
        """The limits as the next request would meet them (for the ``x-ratelimit-*`` headers)."""
        best: dict[str, LimitStatus] = {}
        for _, scope, limits in self._pairs(key, tenant):
            scope.prune(now)
            candidates = (
                ("requests", limits.rpm, scope.requests.total, scope.requests.reset_in(now)),
                ("tokens", limits.tpm, scope.tokens.total, scope.tokens.reset_in(now)),
                ("tokens_per_day", limits.tokens_per_day, scope.day.used,
                 _until_midnight(now) if scope.day.used else 0.0),
            )
            for kind, limit, used, reset in candidates:
                if limit is None:
                    continue
                status = LimitStatus(limit=limit, remaining=max(0, limit - used), reset=reset)
                current = best.get(kind)
                if current is None or (status.remaining, -status.reset) < (current.remaining, -current.reset):
                    best[kind] = status
        return RateLimitStatus(best.get("requests"), best.get("tokens"), best.get("tokens_per_day"))

    def usage(self, kind: str, name: str, now: float) -> tuple[int, int, int]:
        """(requests in the last minute, tokens in the last minute, tokens today) of a key or tenant."""
        scope = self._scopes.get((kind, name))
        if scope is None:
            return 0, 0, 0
        scope.prune(now)
        return scope.requests.total, scope.tokens.total, scope.day.used

    def sweep(self, now: float) -> int:
        """Forget keys and tenants with nothing in any window (call now and then); returns how many."""
        idle = [k for k, scope in self._scopes.items() if scope.idle(now)]
        for k in idle:
            del self._scopes[k]
        return len(idle)

    def __len__(self) -> int:
        return len(self._scopes)


__all__ = [
    "DAY",
    "WINDOW",
    "Admission",
    "LimitStatus",
    "QuotaConfig",
    "QuotaLimiter",
    "RateLimitStatus",
    "ceil_ms",
    "format_duration",
]
