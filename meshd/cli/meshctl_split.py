"""``meshctl plan`` and ``meshctl split``: layer split over the mesh (docs/split.md)."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import urlencode

COMMANDS = ("plan", "split")


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    plan = commands.add_parser("plan", parents=[common],
                               help="where a split model's layers go (this node and peers), and why")
    plan.add_argument("--model", required=True, help="a model configured with split = \"auto\" or \"always\"")
    commands.add_parser("split", parents=[common],
                        help="this node as a split worker and host: offer, worker process, tunnels")


def _mib(n: Any) -> str:
    return f"{int(n) / (1 << 20):.0f} MiB" if isinstance(n, (int, float)) else "-"


def _placements(plan: dict[str, Any]) -> str:
    lines = [f"  {p['name']:<20} {p['layers']:>3} layers  {_mib(p['bytes']):>9}  {p['node'][:15]}"
             for p in plan["placements"]]
    if plan.get("remote_layers"):
        lines.append(f"  output head on the {plan.get('head', 'last worker')}")
    return "\n".join(lines)


def run(args: argparse.Namespace, client: Any) -> tuple[Any, str]:
    if args.command == "split":
        result = client.call("GET", "/v1/split")
        worker = result.get("worker_process") or {}
        lines = [f"worker: {'yes' if result['worker'] else 'no'}"
                 + (f" ({result['unavailable']})" if result.get("unavailable") else "")
                 + f"; offers {_mib(result['memory_bytes'])} at {result['speed_gbs']} GB/s; "
                 f"{result['tunnels']} tunnel(s) open"]
        if worker:
            lines.append(f"worker process: {'running pid ' + str(worker['pid']) if worker['running'] else 'stopped'}"
                         f", rss {_mib(worker['rss_bytes'])}, started {worker['starts']} time(s)")
        for model, plan in result["plans"].items():
            lines += [f"plan in use for {model}:", _placements(plan)]
        return result, "\n".join(lines)
    result = client.call("GET", "/v1/split/plan?" + urlencode({"model": args.model}))
    shape = result["shape"]
    lines = [f"model {result['model']} (split = {result['mode']}): {shape['n_layer']} layers of "
             f"{_mib(shape['layer_bytes'])}, {_mib(shape['other_bytes'])} kept on the host, n_ctx {result['n_ctx']}",
             "offers:"]
    lines += [f"  {o['name']:<20} {_mib(o['memory_bytes']):>9}  {o['speed']:.1f} GB/s  rtt {o['rtt_ms']:.2f} ms"
              for o in result["offers"]]
    if result.get("current"):
        lines += ["in use:", _placements(result["current"])]
    if result.get("now"):
        lines += ["planned now:", _placements(result["now"])]
        lines += [f"  - {why}" for why in result["now"]["reasons"]]
    else:
        lines.append(f"no plan now: {result.get('error')}")
    return result, "\n".join(lines)
