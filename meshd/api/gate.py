"""The API's access gate: who is calling, what they may do, what it costs, and the receipt.

One ``AccessGate`` per node sits between the HTTP handlers and the auth
library (``meshd.auth``) and the receipt log (``meshd.telemetry``). Per
request, the middleware opens a ``Ticket`` (``authenticate``: 401s); the
handler asks ``authorize`` (403s) and ``admit`` (429s) once it knows the
model and the token reservation, fills in what happened (route, tokens,
TTFT), and the middleware ``close``s the ticket: the quota is settled from
real usage (or released when nothing ran) and one receipt is appended.

Quotas are charged here, at the entry node, once per client request whatever
the number of failover attempts; a peer serving a forwarded request checks the
entry node's signed verdict instead (``verify_forwarded``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from identity.keys import NodeKey
from identity.nodeid import NodeId

from ..auth import (
    DATA_CLASS_HEADER,
    Admission,
    KeyRecord,
    KeyStore,
    QuotaConfig,
    QuotaLimiter,
    TenantRecord,
    Verdict,
    VerdictReplayGuard,
    authorize,
    parse_bearer,
    parse_data_class,
    sign_verdict,
    verify_verdict,
    visible_models,
)
from ..auth.model import DataClass
from ..config import AuthConfig
from ..errors import InvalidVerdict, MeshdError
from ..logs import fields
from ..telemetry import Failover, PolicyDecision, Receipt, ReceiptWriter, Route

log = logging.getLogger(__name__)

REQUEST_TYPES = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions",
                 "/v1/embeddings": "embeddings"}
_BYTES_PER_TOKEN = 4  # a cheap prompt estimate for the reservation; settle() replaces it with the real count


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / _BYTES_PER_TOKEN)


@dataclass
class Ticket:
    """One API request as the gate sees it, filled in as the request goes."""

    arrived: float  # epoch seconds
    started: float  # perf_counter
    request_type: str | None = None  # None: not an inference route, no receipt
    key: KeyRecord | None = None
    tenant: TenantRecord | None = None
    request_id: str | None = None
    model: str | None = None
    model_identity: dict[str, Any] | None = None
    data_class: str | None = None
    stream: bool = False
    trace: Any = None  # routing.RouteTrace once routed
    admission: Admission | None = None
    rate_headers: dict[str, str] = field(default_factory=dict)
    policy: list[PolicyDecision] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: bool = False  # usage came from the backend, not counted by us
    ttft_ms: float | None = None
    failed_mid_stream: MeshdError | None = None  # told to the client as an SSE error event after a 200

    @property
    def key_id(self) -> str | None:
        return self.key.key_id if self.key is not None else None

    def delivered(self, token_count: int) -> None:
        """Streamed output the client received (the count used if the request never finishes)."""
        self.completion_tokens += token_count

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens, self.finished = prompt_tokens, completion_tokens, True


class AccessGate:
    def __init__(self, config: AuthConfig, keys: KeyStore, node_key: NodeKey, *,
                 receipts: ReceiptWriter | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.keys = keys
        self.limiter = QuotaLimiter()
        self.quota = QuotaConfig(default_max_tokens=config.default_max_tokens)
        self.receipts = receipts
        self._node_key = node_key
        self.node_id = str(node_key.node_id)
        self._clock = clock
        self._replays = VerdictReplayGuard()

    # --- who is calling ------------------------------------------------------------------

    def required(self) -> bool:
        """Whether /v1/* needs a key now: any key ever created (revoked too) turns keys on."""
        if self.config.insecure_no_auth:
            return False
        self.keys.poll()
        return self.config.require_keys or len(self.keys) > 0

    def open_ticket(self, path: str) -> Ticket:
        return Ticket(arrived=self._clock(), started=time.perf_counter(), request_type=REQUEST_TYPES.get(path))

    def authenticate(self, ticket: Ticket, authorization: str | None) -> None:
        """Raise 401 for a missing, wrong, revoked or expired key when keys are required."""
        if not self.required():
            return
        key = self.keys.authenticate(parse_bearer(authorization), now=self._clock(), refresh=False)
        ticket.key, ticket.tenant = key, self.keys.tenant(key.tenant)

    def visible(self, ticket: Ticket, groups: list[tuple[str, ...]]) -> set[str]:
        """The model names (first of each id+aliases group) this caller may see in /v1/models."""
        if ticket.key is None or ticket.tenant is None:
            return {names[0] for names in groups if names}
        return set(visible_models(ticket.key, ticket.tenant, groups))

    # --- what they may do -------------------------------------------------------------------

    def authorize(self, ticket: Ticket, model: str, aliases: tuple[str, ...], header: str | None,
                  default: str) -> str:
        """The request's data class; 403 ``model_not_allowed`` / ``data_class_not_allowed``."""
        ticket.model = model
        if ticket.key is None or ticket.tenant is None:
            return default if header is None else header
        grant = authorize(ticket.key, ticket.tenant, model=model, aliases=aliases,
                          requested=parse_data_class(header), default=DataClass(default))
        ticket.policy.append(PolicyDecision("authorization", "allowed", f"data class {grant.data_class.value}"))
        return grant.data_class.value

    def admit(self, ticket: Ticket, prompt_text: str, max_tokens: int | None, *, generates: bool = True) -> None:
        """Reserve tokens against the key's and tenant's limits; 429 ``rate_limit_exceeded``."""
        if ticket.key is None or ticket.tenant is None:
            return
        reserve = self.quota.reservation(estimate_tokens(prompt_text), max_tokens, generates=generates)
        try:
            admission = self.limiter.admit(ticket.key, ticket.tenant, reserve, self._clock())
        except MeshdError as exc:
            ticket.policy.append(PolicyDecision("quota", "refused", exc.message[:500]))
            raise
        ticket.admission = admission
        ticket.rate_headers = admission.status.headers()
        ticket.policy.append(PolicyDecision("quota", "admitted", f"reserved {reserve} tokens"))

    def headers_for(self, ticket: Ticket) -> dict[str, str]:
        """``x-ratelimit-*`` for a keyed caller: as admitted, or as the limits stand now."""
        if ticket.rate_headers or ticket.key is None or ticket.tenant is None:
            return ticket.rate_headers
        return self.limiter.status(ticket.key, ticket.tenant, self._clock()).headers()

    # --- forwarding ----------------------------------------------------------------------------

    def verdict_for(self, ticket: Ticket | None, peer: str, request_id: str, model: str,
                    data_class: str) -> bytes | None:
        """The signed verdict a forwarded request carries; None for a caller without a key."""
        if ticket is None or ticket.key is None:
            return None
        verdict = Verdict(request_id=request_id[:256], key_id=ticket.key.key_id, tenant=ticket.key.tenant,
                          model=model, data_class=DataClass(data_class), audience=NodeId.parse(peer))
        return sign_verdict(self._node_key, verdict, self._clock())

    def verify_forwarded(self, peer: NodeId, verdict: bytes | None) -> Verdict | None:
        """A forwarded request's verdict, checked; 403 when it is bad, or missing while keys are required."""
        if verdict is None:
            if self.required():
                raise InvalidVerdict(f"this node requires API keys and the request from {peer} carries no "
                                     "verdict of the entry node", code="verdict_missing")
            return None
        return verify_verdict(verdict, peer, self._clock(), audience=self._node_key.node_id,
                              replay_guard=self._replays)

    # --- after the response -------------------------------------------------------------------

    def close(self, ticket: Ticket, status: int, error: MeshdError | None, cancelled: bool = False) -> None:
        """Settle or release the quota and append the receipt."""
        if ticket.admission is not None:
            ran = ticket.finished or ticket.completion_tokens > 0
            if ran:
                self.limiter.settle(ticket.admission, ticket.prompt_tokens + ticket.completion_tokens,
                                    self._clock())
            else:
                self.limiter.release(ticket.admission, self._clock())
        if ticket.request_type is None or self.receipts is None:
            return
        error = error or ticket.failed_mid_stream
        try:
            receipt = self._receipt(ticket, status, error, cancelled)
        except MeshdError as exc:  # a receipt that does not validate is a bug: log it, keep serving
            log.error("receipt not written", extra=fields(request_id=ticket.request_id, error=exc.message))
            return
        self.receipts.append(receipt)

    def _receipt(self, ticket: Ticket, status: int, error: MeshdError | None, cancelled: bool) -> Receipt:
        trace = ticket.trace
        serving = trace.node_header() if trace is not None and trace.served_by is not None else None
        failovers = tuple(Failover(target, code) for target, code in (trace.failures if trace is not None else ()))
        outcome = "cancelled" if cancelled else "error" if error is not None or status >= 400 else "success"
        code = None if outcome == "success" else (error.code if error is not None else "client_closed_request"
                                                  if cancelled else f"http_{status}")
        return Receipt(
            time=ticket.arrived,
            request_id=ticket.request_id or "-",
            request_type=ticket.request_type or "chat.completions",
            model=ticket.model or "-",
            route=Route(entry_node=self.node_id, serving_node=serving, failovers=failovers),
            outcome=outcome,
            status=status,
            latency_ms=(time.perf_counter() - ticket.started) * 1000,
            key_id=ticket.key_id,
            tenant=ticket.key.tenant if ticket.key is not None else None,
            model_identity=ticket.model_identity,
            data_class=ticket.data_class,
            tier=None if serving is None else "local" if serving == self.node_id else "peer",
            policy=tuple(ticket.policy),
            prompt_tokens=ticket.prompt_tokens,
            completion_tokens=ticket.completion_tokens,
            tokens_estimated=not ticket.finished and ticket.completion_tokens > 0,
            ttft_ms=ticket.ttft_ms,
            error_code=code,
            stream=ticket.stream,
        )


__all__ = ["DATA_CLASS_HEADER", "AccessGate", "Ticket", "estimate_tokens"]
