"""``meshctl usage``: tokens and requests per tenant, key and model, summed from receipts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .receipts import parse_time

GROUPS = ("tenant", "key_id", "model")


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Totals for one group; a dimension not grouped by is None ("all")."""

    tenant: str | None
    key_id: str | None
    model: str | None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant, "key_id": self.key_id, "model": self.model,
            "requests": self.requests, "errors": self.errors, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
        }


def summarize(
    records: Iterable[Mapping[str, Any]],
    since: float | None = None,
    tenant: str | None = None,
    *,
    until: float | None = None,
    by: tuple[str, ...] = GROUPS,
) -> list[UsageRow]:
    """Sum receipts (``time`` in [since, until), of ``tenant`` if given) per ``by`` group, sorted.

    Every request counts, failed ones too (``errors`` says how many failed);
    tokens are what was reported (or estimated) for each request.
    """
    unknown = [g for g in by if g not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {unknown}; choose from {GROUPS}")
    totals: dict[tuple[Any, ...], list[int]] = {}
    for record in records:
        if tenant is not None and record.get("tenant") != tenant:
            continue
        if since is not None or until is not None:
            try:
                when = parse_time(record["time"])
            except (KeyError, TypeError, ValueError):
                continue
            if (since is not None and when < since) or (until is not None and when >= until):
                continue
        group = tuple(record.get(g) if g in by else None for g in GROUPS)
        row = totals.setdefault(group, [0, 0, 0, 0])
        row[0] += 1
        row[1] += 0 if record.get("success", record.get("outcome") == "success") else 1
        row[2] += _count(record.get("prompt_tokens"))
        row[3] += _count(record.get("completion_tokens"))
    rows = [UsageRow(g[0], g[1], g[2], *values) for g, values in totals.items()]
    return sorted(rows, key=lambda r: (r.tenant or "", r.key_id or "", r.model or ""))


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def format_usage(rows: list[UsageRow]) -> str:
    """A plain text table with a total line (``meshctl usage`` without ``--json``)."""
    header = ("TENANT", "KEY", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL")
    body = [
        (r.tenant or "-", r.key_id or "-", r.model or "-", str(r.requests), str(r.errors),
         str(r.prompt_tokens), str(r.completion_tokens), str(r.total_tokens))
        for r in rows
    ]
    total = (
        "total", "", "",
        str(sum(r.requests for r in rows)), str(sum(r.errors for r in rows)),
        str(sum(r.prompt_tokens for r in rows)), str(sum(r.completion_tokens for r in rows)),
        str(sum(r.total_tokens for r in rows)),
    )
    table = [header, *body, total]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    numeric = range(3, len(header))
    return "\n".join(
        "  ".join(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                  for i, cell in enumerate(row)).rstrip()
        for row in table
    )


__all__ = ["GROUPS", "UsageRow", "format_usage", "summarize"]
