"""The admin API: JSON over HTTP on a Unix socket in the state dir, for meshctl.

Never on TCP. The socket is created 0600 (0660 with a configured group), and
the caller's uid (SO_PEERCRED) is recorded as "added by" on trust changes.
With a group, the state dir also becomes 0710 for that group: without
traverse on its directory a group-writable socket is unreachable.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from identity import IdentityError, InvalidNodeId, NodeId
from identity.statedir import share_state_dir
from peers import InvalidRole, PeerNotTrusted, TrustError, TrustStore, parse_roles
from peers.trust_model import AmbiguousNodeId, TrustChange

from .. import __version__
from ..logs import fields

log = logging.getLogger(__name__)

SOCKET_NAME = "meshd.sock"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class AdminConfig:
    socket_path: Path
    group: str | None = None  # lets members of this group use meshctl (0660)


class AdminGroupError(OSError):
    """``admin.group`` cannot be applied: no such group, or no right to use it.

    An ``OSError`` so the daemon reports it as it reports any other failure to
    create the admin socket: one line naming the socket, exit code 1.
    """


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def caller_name(request: web.Request) -> str:
    """The local user on the other end of the socket, from the kernel, not the client."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return ""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", raw)
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return ""


def describe_change(change: TrustChange) -> dict[str, Any]:
    body: dict[str, Any] = {"event": type(change).__name__}
    node_id = getattr(change, "node_id", None)
    if node_id is not None:
        body["node_id"] = str(node_id)
    return body


class AdminServer:
    def __init__(self, config: AdminConfig, node_id: NodeId, name: str, trust: TrustStore,
                 on_trust_change: Callable[[tuple[TrustChange, ...]], None], api_url: Callable[[], str],
                 mesh: Any = None) -> None:
        self.config = config
        self.mesh = mesh
        self.dispatcher: Any = None
        self.drain: Callable[[], Awaitable[dict[str, Any]]] | None = None  # Daemon.drain
        self.split: Any = None  # meshd.split.node.SplitNode
        self.split_specs: dict[str, Any] = {}  # model id or alias -> ModelSpec of a split model
        self.node_id = node_id
        self.name = name
        self.trust = trust
        self._on_trust_change = on_trust_change
        self._api_url = api_url
        self._runner: web.AppRunner | None = None

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=64 * 1024)
        app.router.add_get("/v1/node", self.node)
        app.router.add_get("/v1/trust", self.trust_list)
        app.router.add_post("/v1/trust", self.trust_add)
        app.router.add_get("/v1/trust/{node}", self.trust_show)
        app.router.add_delete("/v1/trust/{node}", self.trust_revoke)
        app.router.add_get("/v1/peers", self.peers)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/route", self.route)
        app.router.add_post("/v1/peers", self.peers_add)
        app.router.add_post("/v1/drain", self.drain_node)
        app.router.add_get("/v1/split", self.split_status)
        app.router.add_get("/v1/split/plan", self.split_plan)
        return app

    def _group_id(self) -> int | None:
        group = self.config.group
        if not group:
            return None
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise AdminGroupError(errno.ENOENT, f"admin.group: there is no group named {group!r}") from None

    async def start(self) -> None:
        path = self.config.socket_path
        gid = self._group_id()  # before anything is created: a typo fails cleanly
        if path.is_socket() or path.exists():
            path.unlink()  # a stale socket: the state-dir lock proves no live daemon owns it
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        old = os.umask(0o177)  # created 0600: never a window where others could connect
        try:
            await web.UnixSite(self._runner, str(path)).start()
        finally:
            os.umask(old)
        if gid is None:
            share_state_dir(path.parent, None)  # take back what an earlier admin.group gave
            return
        try:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
            # The group also needs traverse on the directory, or it cannot reach the socket.
            share_state_dir(path.parent, gid)
        except PermissionError as exc:
            # Giving a file to a group needs root or membership of that group.
            raise AdminGroupError(
                errno.EPERM, f"admin.group: cannot give group {self.config.group!r} access ({exc.strerror}); "
                "meshd must run as root or as a member of that group") from None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.config.socket_path.unlink(missing_ok=True)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except InvalidNodeId as exc:
            return _error(400, "invalid_node_id", str(exc))
        except (InvalidRole, ValueError) as exc:
            return _error(400, "invalid_request", str(exc))
        except PeerNotTrusted as exc:
            return _error(404, "not_trusted", str(exc))
        except AmbiguousNodeId as exc:
            return _error(409, "ambiguous_node_id", str(exc))
        except (TrustError, IdentityError) as exc:
            return _error(409, "trust_store_error", str(exc))
        except web.HTTPException as exc:
            return _error(exc.status, "not_found" if exc.status == 404 else "bad_request", exc.reason)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ValueError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        return body

    # --- routes ----------------------------------------------------------------

    async def node(self, request: web.Request) -> web.Response:
        return web.json_response({
            "node_id": str(self.node_id), "short_id": self.node_id.short(), "name": self.name,
            "version": __version__, "api_url": self._api_url(),
        })

    async def trust_list(self, request: web.Request) -> web.Response:
        error = self.trust.last_error
        return web.json_response({
            "entries": [e.to_dict() for e in self.trust.list()],
            "file_error": str(error) if error else None,
        })

    async def trust_show(self, request: web.Request) -> web.Response:
        node_id = self.trust.resolve(request.match_info["node"])
        entry = self.trust.get(node_id)
        if entry is None:
            raise PeerNotTrusted(f"{node_id} is not trusted")
        return web.json_response({"entry": entry.to_dict()})

    async def trust_add(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        node_id = NodeId.parse(str(body.get("node_id", "")))
        if node_id == self.node_id:
            raise ValueError("that is this node's own id; trust is for other nodes")
        roles = parse_roles(body["roles"]) if body.get("roles") is not None else None
        existed = self.trust.get(node_id) is not None
        changes = self.trust.add(
            node_id,
            roles=roles if roles is not None else (self.trust.roles_of(node_id) if existed else parse_roles("all")),
            name=body.get("name"),
            note=body.get("note"),
            added_by=caller_name(request),
        )
        self._changed(changes, request)
        entry = self.trust.get(node_id)
        return web.json_response(
            {"entry": entry.to_dict() if entry else None, "created": not existed,
             "changes": [describe_change(c) for c in changes]},
            status=200 if existed else 201,
        )

    async def trust_revoke(self, request: web.Request) -> web.Response:
        node_id = self.trust.resolve(request.match_info["node"])
        changes = self.trust.revoke(node_id)
        self._changed(changes, request)
        return web.json_response({"revoked": str(node_id), "changes": [describe_change(c) for c in changes]})

    def _mesh(self) -> Any:
        if self.mesh is None:
            raise web.HTTPServiceUnavailable(reason="the mesh is not running on this node")
        return self.mesh

    async def peers(self, request: web.Request) -> web.Response:
        return web.json_response(self._mesh().snapshot())

    async def models(self, request: web.Request) -> web.Response:
        """Every model this node can route to, and where it lives."""
        rows = []
        router = self.dispatcher.router
        for backend, info in router.catalog.models():
            load = backend.load()
            rows.append({"model": info.id, "aliases": list(info.aliases), "node": str(self.node_id),
                         "name": self.name, "location": "local", "state": info.state, "backend": backend.name,
                         "identity": (info.details or {}).get("sha256"), "context_length": info.context_length,
                         "descriptor": (info.details or {}).get("identity"),
                         "load": {"in_flight": load.in_flight, "queued": load.queued}})
        mesh = self.mesh
        for record in mesh.table.peers() if mesh is not None else []:
            for model in record.models:
                rows.append({"model": model.get("id"), "aliases": model.get("aliases", []),
                             "node": str(record.node_id), "name": record.name, "location": "peer",
                             "state": model.get("state"), "backend": model.get("backend"),
                             "identity": model.get("sha256"), "context_length": model.get("context_length"),
                             "descriptor": model.get("identity"),
                             "load": record.load, "peer_state": record.state.value,
                             "serve_trusted": self.trust.allows(record.node_id, "serve")})
        return web.json_response({"models": rows})

    async def route(self, request: web.Request) -> web.Response:
        """The decision the router would take now, without sending anything."""
        from ..errors import MeshdError

        model = request.query.get("model", "")
        if not model:
            raise ValueError("give ?model=NAME")
        router = self.dispatcher.router
        try:
            data_class = router.data_class(request.query.get("data_class"))
            decision = router.decide(model, data_class)
        except MeshdError as exc:
            return web.json_response({"model": model, "error": exc.to_openai()["error"]}, status=200)
        return web.json_response(decision.to_dict())

    async def peers_add(self, request: web.Request) -> web.Response:
        from ..config import ConfigError, parse_listen

        body = await self._body(request)
        try:
            address = parse_listen("address", body.get("address"))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        self._mesh().add_static_peer(address.host, address.port)
        log.info("static peer added", extra=fields(address=str(address), by=caller_name(request) or "?"))
        return web.json_response({"added": str(address)}, status=201)

    async def drain_node(self, request: web.Request) -> web.Response:
        """Stop admitting, finish in-flight work, hand cached conversations to peers; the daemon then exits."""
        if self.drain is None:
            raise web.HTTPServiceUnavailable(reason="this node cannot drain yet (still starting)")
        log.info("drain requested", extra=fields(by=caller_name(request) or "?"))
        return web.json_response(await self.drain())

    async def split_status(self, request: web.Request) -> web.Response:
        """This node as a split worker and host: offer, worker process, tunnels, plans in use."""
        if self.split is None:
            raise web.HTTPServiceUnavailable(reason="layer split is not running on this node")
        return web.json_response(self.split.status())

    async def split_plan(self, request: web.Request) -> web.Response:
        """``meshctl plan``: where a split model's layers go, and why."""
        if self.split is None:
            raise web.HTTPServiceUnavailable(reason="layer split is not running on this node")
        model = request.query.get("model", "")
        spec = self.split_specs.get(model)
        if spec is None:
            known = ", ".join(sorted({s.id for s in self.split_specs.values()})) or "none"
            raise ValueError(f"{model!r} is not a split model here (split models: {known}; "
                             "set split = \"auto\" or \"always\" on a [[models]] entry)")
        return web.json_response(await self.split.explain(spec))

    def _changed(self, changes: tuple[TrustChange, ...], request: web.Request) -> None:
        if changes:
            log.info("trust changed", extra=fields(by=caller_name(request) or "?",
                                                   changes=",".join(type(c).__name__ for c in changes)))
            self._on_trust_change(changes)


__all__ = ["AdminConfig", "AdminGroupError", "AdminServer", "SOCKET_NAME"]
