"""``meshctl keys``, ``meshctl receipts`` and ``meshctl usage``: files in the state dir, no daemon needed.

The key file and the receipt log are the truth (the daemon re-reads the key
file on every request), so these commands work whether or not meshd runs:
a key can be created before the first start of a node that listens beyond
loopback, and receipts can be audited on a stopped node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..config import DEFAULT_STATE_DIR

DATA_CLASSES = ("public", "internal", "confidential", "secret")
COMMANDS = ("keys", "tenants", "receipts", "usage")


class LocalUsageError(Exception):
    """Bad input or a refused change: exit code 2."""


def _limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", help="comma-separated model ids or globs (default: all)")
    parser.add_argument("--rpm", type=int, help="requests per minute")
    parser.add_argument("--tpm", type=int, help="tokens per minute (prompt + completion)")
    parser.add_argument("--tokens-per-day", type=int, help="tokens per UTC day")
    parser.add_argument("--max-data-class", choices=DATA_CLASSES, default="secret",
                        help="the most sensitive data class its requests may carry (default: secret)")
    parser.add_argument("--note", default="", help="a free-text note")


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    keys = commands.add_parser("keys", parents=[common], help="API keys for this node's OpenAI endpoint")
    keys_cmds = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = keys_cmds.add_parser("create", parents=[common], help="create a key and print its secret once")
    create.add_argument("--name", required=True, help="a name for the key, unique among live keys")
    create.add_argument("--tenant", default="default", help="the tenant whose limits also apply (default: default)")
    create.add_argument("--expires", help="YYYY-MM-DD, an ISO date-time, or a duration such as 30d, 12h")
    _limit_options(create)
    keys_cmds.add_parser("list", parents=[common], help="every key, revoked ones too")
    show = keys_cmds.add_parser("show", parents=[common], help="one key")
    show.add_argument("key", metavar="KEY", help="a key id, name or the secret itself")
    revoke = keys_cmds.add_parser("revoke", parents=[common], help="revoke a key (refused from the next request)")
    revoke.add_argument("key", metavar="KEY", help="a key id, name or the secret itself")

    tenants = commands.add_parser("tenants", parents=[common], help="limits shared by all keys of a tenant")
    tenant_cmds = tenants.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)
    tenant_set = tenant_cmds.add_parser("set", parents=[common], help="configure (or replace) a tenant's limits")
    tenant_set.add_argument("name", metavar="TENANT")
    _limit_options(tenant_set)
    tenant_cmds.add_parser("list", parents=[common], help="configured tenants and those named by keys")
    tenant_remove = tenant_cmds.add_parser("remove", parents=[common], help="drop a tenant's limits")
    tenant_remove.add_argument("name", metavar="TENANT")

    receipts = commands.add_parser("receipts", parents=[common], help="the hash-chained per-request receipts")
    receipts.add_argument("action", nargs="?", choices=["verify"], help="verify: check the whole chain")
    receipts.add_argument("--tail", type=int, metavar="N", default=20, help="the last N receipts (default 20)")
    receipts.add_argument("--follow", action="store_true", help="keep printing receipts as they are written")
    receipts.add_argument("--tenant", help="only this tenant's receipts")
    receipts.add_argument("--allow-pruned", action="store_true", help="verify: old files were removed on purpose")

    usage = commands.add_parser("usage", parents=[common], help="tokens and requests per tenant, key and model")
    usage.add_argument("--tenant", help="only this tenant")
    usage.add_argument("--since", help="90m, 24h, 7d, a date or an ISO date-time (default: everything)")


def state_dir(args: argparse.Namespace, env: dict[str, str]) -> Path:
    return Path(args.state_dir or env.get("MESHD_STATE_DIR") or DEFAULT_STATE_DIR).expanduser()


def run(args: argparse.Namespace, env: dict[str, str]) -> tuple[Any, str]:
    root = state_dir(args, env)
    if args.command == "keys":
        return keys_command(args, root)
    if args.command == "tenants":
        return tenants_command(args, root)
    if args.command == "usage":
        return usage_command(args, root)
    return receipts_command(args, root)


# --- keys -------------------------------------------------------------------------------------


def _key_row(record: Any, now: float) -> list[str]:
    body = record.to_dict(now)
    limits = ",".join(f"{k}={v}" for k, v in body["limits"].items() if v is not None) or "-"
    return [body["key_id"], body["name"], body["tenant"], body["status"], ",".join(body["models"] or ["*"]),
            limits, body["max_data_class"], (body["expires_at"] or "-")[:19]]


def keys_command(args: argparse.Namespace, root: Path) -> tuple[Any, str]:
    from ..auth import DataClass, KeyStore, KeyStoreError, Limits, parse_expiry, parse_models
    from .meshctl import table

    now = time.time()
    try:
        store = KeyStore.open(root)
        action = args.keys_command
        if action == "create":
            limits = Limits(rpm=args.rpm, tpm=args.tpm, tokens_per_day=args.tokens_per_day)
            expires = parse_expiry(args.expires, now=now) if args.expires else None
            record, secret = store.create(
                args.name, now=now, tenant=args.tenant, models=parse_models(args.models), limits=limits,
                max_data_class=DataClass.parse(args.max_data_class), expires_at=expires,
                created_by=f"meshctl ({os.environ.get('USER') or os.getuid()})", note=args.note)
            result = {"secret": secret, "key": record.to_dict(now)}
            return result, (f"created key {record.key_id} ({record.name}, tenant {record.tenant})\n{secret}\n"
                            "This secret is shown once and stored nowhere: keep it now.")
        if action == "list":
            records = store.list()
            rows = [_key_row(r, now) for r in records]
            text = table(rows, ["KEY ID", "NAME", "TENANT", "STATUS", "MODELS", "LIMITS", "MAX CLASS", "EXPIRES"]) \
                if rows else "no API keys (the API is open on loopback until one is created)"
            return {"keys": [r.to_dict(now) for r in records]}, text
        record = store.resolve(args.key) if action == "show" else store.revoke(args.key, now=now)
        body = record.to_dict(now)
        if action == "revoke":
            return {"revoked": body}, f"revoked {record.key_id} ({record.name})"
        return body, "\n".join(f"{k + ':':15} {v if v not in (None, '') else '-'}" for k, v in body.items())
    except (KeyStoreError, ValueError) as exc:
        raise LocalUsageError(getattr(exc, "message", None) or str(exc)) from None


def tenants_command(args: argparse.Namespace, root: Path) -> tuple[Any, str]:
    from ..auth import DataClass, KeyStore, KeyStoreError, Limits, TenantRecord, parse_models
    from .meshctl import table

    try:
        store = KeyStore.open(root)
        if args.tenants_command == "set":
            tenant = store.set_tenant(TenantRecord(
                args.name, limits=Limits(rpm=args.rpm, tpm=args.tpm, tokens_per_day=args.tokens_per_day),
                models=parse_models(args.models), max_data_class=DataClass.parse(args.max_data_class),
                note=args.note))
            return tenant.to_dict(), f"tenant {tenant.name} configured"
        if args.tenants_command == "remove":
            store.remove_tenant(args.name)
            return {"removed": args.name}, f"tenant {args.name} removed; its keys keep their own limits"
        tenants = [t.to_dict() for t in store.tenants()]
        rows = [[t["name"], ",".join(f"{k}={v}" for k, v in t["limits"].items() if v is not None) or "-",
                 ",".join(t["models"] or ["*"]), t["max_data_class"]] for t in tenants]
        return {"tenants": tenants}, table(rows, ["TENANT", "LIMITS", "MODELS", "MAX CLASS"]) if rows else "no tenants"
    except (KeyStoreError, ValueError) as exc:
        raise LocalUsageError(getattr(exc, "message", None) or str(exc)) from None


# --- receipts and usage ------------------------------------------------------------------------


def receipts_command(args: argparse.Namespace, root: Path) -> tuple[Any, str]:
    from ..telemetry import ReceiptFilter, format_receipt, tail, verify_chain

    directory = root / "receipts"
    if args.action == "verify":
        report = verify_chain(directory, allow_pruned=args.allow_pruned)
        result = {"ok": report.ok, "files": report.files, "records": report.records,
                  "problems": [str(p) for p in report.problems], "warnings": list(report.warnings),
                  "last_seq": report.last_seq}
        if not report.ok:
            raise ChainBroken(result, report.describe())
        return result, report.describe()
    selector = ReceiptFilter(tenant=args.tenant)
    if args.follow:
        follow_receipts(directory, selector, as_json=args.json)
    if args.tail < 0:
        raise LocalUsageError("--tail must be 0 or more")
    lines = tail(directory, args.tail, selector)
    records = [line.record for line in lines]
    return {"receipts": records}, "\n".join(format_receipt(r) for r in records) or "no receipts"


def follow_receipts(directory: Path, selector: Any, *, as_json: bool) -> None:
    from ..telemetry import follow, format_receipt

    try:
        for line in follow(directory, selector):
            print(json.dumps(line.record) if as_json else format_receipt(line.record), flush=True)
    except KeyboardInterrupt:
        sys.exit(0)


def usage_command(args: argparse.Namespace, root: Path) -> tuple[Any, str]:
    from ..telemetry import format_usage, parse_since, read_receipts, summarize

    try:
        since = parse_since(args.since, now=time.time()) if args.since else None
    except ValueError as exc:
        raise LocalUsageError(str(exc)) from None
    rows = summarize(read_receipts(root / "receipts"), since, args.tenant)
    return {"usage": [r.to_dict() for r in rows]}, format_usage(rows) if rows else "no usage recorded"


class ChainBroken(Exception):
    """``receipts verify`` found a problem: print the report, exit 1."""

    def __init__(self, result: dict[str, Any], text: str) -> None:
        super().__init__(text)
        self.result, self.text = result, text


__all__ = ["COMMANDS", "ChainBroken", "LocalUsageError", "add_parsers", "run"]
