"""``meshctl``: talk to the local meshd over its admin socket.

``keys``, ``receipts`` and ``usage`` read and write the state dir directly
(meshctl_auth.py). Exit codes: 0 done, 1 the daemon is not running or refused
(or ``receipts verify`` found a problem), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import DEFAULT_STATE_DIR
from . import meshctl_auth, meshctl_split
from .admin_client import AdminClient, AdminError, DaemonNotRunning

ROLES_HELP = "comma-separated roles: serve (send my users' requests to it), use (it may send requests to me), " \
             "cache (KV/session exchange), tensor (shard work), or all (default)"


class UsageError(Exception):
    """Bad input found before talking to the daemon: exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    def common_options(suppress: bool) -> argparse.ArgumentParser:
        # The options work before or after the subcommand; subcommands must not
        # reset a value given earlier, hence SUPPRESS as their default.
        default = {"default": argparse.SUPPRESS} if suppress else {}
        options = argparse.ArgumentParser(add_help=False)
        options.add_argument("--state-dir", metavar="DIR", help="the daemon's state dir (env MESHD_STATE_DIR)",
                             **default)
        options.add_argument("--socket", metavar="PATH", help="the admin socket (default STATE_DIR/meshd.sock)",
                             **default)
        options.add_argument("--json", action="store_true", help="machine-readable output", **default)
        return options

    common = common_options(suppress=True)
    parser = argparse.ArgumentParser(prog="meshctl", description="Control the local meshd node.",
                                     parents=[common_options(suppress=False)])
    parser.add_argument("--version", action="version", version=f"meshctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("id", parents=[common], help="this node's id and name")

    peers = commands.add_parser("peers", parents=[common], help="discovered, connected and trusted peers")
    peers_cmds = peers.add_subparsers(dest="peers_command", metavar="ACTION")
    peers_add = peers_cmds.add_parser("add", parents=[common], help="dial a peer at HOST:PORT (no multicast needed)")
    peers_add.add_argument("address", metavar="HOST:PORT")

    commands.add_parser("models", parents=[common], help="local and mesh-wide models, where they live, their load")
    route = commands.add_parser("route", parents=[common], help="which node would serve a request now, and why")
    route.add_argument("--model", required=True, help="a model id or alias")
    route.add_argument("--data-class", choices=["public", "internal", "confidential", "secret"],
                       help="the request's data class (default: the node's configured default)")

    commands.add_parser("drain", parents=[common],
                        help="stop taking requests, finish in-flight ones, hand cached conversations "
                             "(KV caches) to trusted peers, then stop the daemon")

    trust = commands.add_parser("trust", parents=[common], help="which peers this node trusts, and for what")
    trust_cmds = trust.add_subparsers(dest="trust_command", metavar="ACTION", required=True)
    add = trust_cmds.add_parser("add", parents=[common], help="trust a peer (or change its roles)")
    add.add_argument("node_id", metavar="NODE-ID")
    add.add_argument("--name", help="a display name, e.g. laptop")
    add.add_argument("--roles", help=ROLES_HELP)
    add.add_argument("--note", help="a free-text note")
    trust_cmds.add_parser("list", parents=[common], help="every trusted peer")
    show = trust_cmds.add_parser("show", parents=[common], help="one trusted peer")
    show.add_argument("node_id", metavar="NODE-ID", help="an id or a unique prefix of one")
    revoke = trust_cmds.add_parser("revoke", parents=[common], help="stop trusting a peer (disconnects it)")
    revoke.add_argument("node_id", metavar="NODE-ID", help="an id or a unique prefix of one")
    meshctl_auth.add_parsers(commands, common)
    meshctl_split.add_parsers(commands, common)
    return parser


def socket_path(args: argparse.Namespace, env: dict[str, str]) -> Path:
    if args.socket:
        return Path(args.socket)
    state = args.state_dir or env.get("MESHD_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(state).expanduser() / "meshd.sock"


def check_node_id(text: str) -> str:
    """Full-length ids are checked here, so a typo never reaches the network."""
    from identity import InvalidNodeId, NodeId

    try:
        return str(NodeId.parse(text))
    except InvalidNodeId as exc:
        raise UsageError(f"invalid node id {text!r}: {exc}") from None


def check_roles(text: str | None) -> list[str] | None:
    if text is None:
        return None
    from peers import InvalidRole, parse_roles

    try:
        return sorted(r.value for r in parse_roles(text))
    except InvalidRole as exc:
        raise UsageError(str(exc)) from None


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def show_entry(entry: dict[str, Any]) -> str:
    keys = ["node_id", "name", "roles", "added_at", "added_by", "note"]
    return "\n".join(f"{k + ':':10} {', '.join(entry[k]) if k == 'roles' else entry.get(k) or '-'}" for k in keys)


STATE_HINTS = {"untrusted": "untrusted — run meshctl trust add {id}"}


def peers_command(args: argparse.Namespace, client: AdminClient) -> tuple[Any, str]:
    if getattr(args, "peers_command", None) == "add":
        from ..config import ConfigError, parse_listen

        try:
            address = str(parse_listen("address", args.address))
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        result = client.call("POST", "/v1/peers", {"address": address})
        return result, f"added static peer {result['added']}"
    result = client.call("GET", "/v1/peers")
    rows = []
    for peer in result["peers"]:
        state = STATE_HINTS.get(peer["state"], peer["state"]).format(id=peer["node_id"])
        rtt = f"{peer['rtt_ms']:.2f}ms" if peer["rtt_ms"] is not None else "-"
        models = ",".join(m.get("id", "?") for m in peer["models"]) or "-"
        load = peer["load"]
        load_text = f"{load.get('in_flight', 0)}/{load.get('queued', 0)}" if load else "-"
        rows.append([peer["node_id"], peer["name"] or "-", state, ",".join(peer["addresses"]) or "-", rtt, models,
                     load_text, ",".join(peer["roles"]) or "-"])
    text = table(rows, ["NODE ID", "NAME", "STATE", "ADDRESSES", "RTT", "MODELS", "LOAD", "ROLES"]) \
        if rows else "no peers yet"
    waiting = [s["address"] for s in result["static"] if not s["node_id"]]
    if waiting:
        text += "\nstatic peers not reached yet: " + ", ".join(waiting)
    for conflict in result["self_conflict"]:
        text += "\nCONFLICT: another live daemon uses this node's id at " + ", ".join(conflict["addresses"])
    return result, text


def run(args: argparse.Namespace, client: AdminClient) -> tuple[Any, str]:
    """Returns (json result, human text)."""
    if args.command == "id":
        node = client.call("GET", "/v1/node")
        return node, f"{node['node_id']}  {node['name']}"
    if args.command == "peers":
        return peers_command(args, client)
    if args.command == "models":
        result = client.call("GET", "/v1/models")
        rows = [[m["model"], m["location"], (m["name"] or "-") + " " + m["node"][:15], m["state"] or "-",
                 (m["identity"] or "-")[:12], f"{m['load'].get('in_flight', 0)}/{m['load'].get('queued', 0)}"
                 if m["load"] else "-"] for m in result["models"]]
        return result, table(rows, ["MODEL", "WHERE", "NODE", "STATE", "SHA256", "LOAD"]) if rows else "no models"
    if args.command == "route":
        from urllib.parse import urlencode

        query = {"model": args.model, **({"data_class": args.data_class} if args.data_class else {})}
        result = client.call("GET", "/v1/route?" + urlencode(query))
        if "error" in result:
            return result, f"no route for {args.model}: {result['error']['message']} ({result['error']['code']})"
        lines = [f"model {result['model']} ({result['data_class']}, strategy {result['strategy']}): "
                 f"served by {result['chosen']['target']} — {result['chosen']['reason']}"]
        rows = [[str(i + 1), c["target"][:31], c["model"], f"{c['score']:g}",
                 f"{c['rtt_ms']:.2f}ms" if c["rtt_ms"] is not None else "-", c["reason"]]
                for i, c in enumerate(result["candidates"])]
        lines.append(table(rows, ["#", "CANDIDATE", "MODEL", "LOAD", "RTT", "WHY"]))
        lines += [f"excluded {e['target'][:31]}: {e['why']}" for e in result["excluded"]]
        return result, "\n".join(lines)
    if args.command == "drain":
        result = client.call("POST", "/v1/drain")
        lines = [f"moved {len(result['moved'])} cached conversation(s)"
                 + ("" if result.get("kvcache") else " (kvcache is not enabled on this node)")]
        lines += [f"  {m['prefix_sha256'][:12]} ({m['tokens']} tokens) -> {m['peer']}" for m in result["moved"]]
        lines += [f"  not moved {f['prefix_sha256'][:12]}: {f['error']}" for f in result["failed"]]
        return result, "\n".join(lines + ["the daemon is stopping"])
    action = args.trust_command
    if action == "add":
        body = {"node_id": check_node_id(args.node_id), "name": args.name, "roles": check_roles(args.roles),
                "note": args.note}
        result = client.call("POST", "/v1/trust", body)
        verb = "trusted" if result["created"] else "updated"
        entry = result["entry"]
        return result, f"{verb} {entry['node_id']} ({entry['name'] or 'no name'}) roles: {', '.join(entry['roles'])}"
    if action == "list":
        result = client.call("GET", "/v1/trust")
        rows = [[e["node_id"], e["name"] or "-", ",".join(e["roles"]), e["added_at"] or "-", e["added_by"] or "-"]
                for e in result["entries"]]
        text = table(rows, ["NODE ID", "NAME", "ROLES", "ADDED", "BY"]) if rows else "no trusted peers"
        if result.get("file_error"):
            text += f"\nwarning: the trust file has an error; the last good state is in force: {result['file_error']}"
        return result, text
    if action == "show":
        result = client.call("GET", f"/v1/trust/{args.node_id}")
        return result, show_entry(result["entry"])
    result = client.call("DELETE", f"/v1/trust/{args.node_id}")
    return result, f"revoked {result['revoked']}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A drain waits for in-flight requests and cache transfers: longer than any other call.
    client = AdminClient(socket_path(args, dict(os.environ)), timeout=600.0 if args.command == "drain" else 30.0)
    try:
        if args.command in meshctl_auth.COMMANDS:
            result, text = meshctl_auth.run(args, dict(os.environ))
        elif args.command in meshctl_split.COMMANDS:
            result, text = meshctl_split.run(args, client)
        else:
            result, text = run(args, client)
    except meshctl_auth.ChainBroken as exc:
        print(json.dumps(exc.result, indent=2) if args.json else exc.text)
        return 1
    except (UsageError, meshctl_auth.LocalUsageError) as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 2
    except DaemonNotRunning as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 1
    except AdminError as exc:
        print(f"meshctl: {exc.message}", file=sys.stderr)
        return 2 if exc.code in ("invalid_node_id", "invalid_request", "ambiguous_node_id") else 1
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
