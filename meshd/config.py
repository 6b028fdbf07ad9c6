"""Daemon configuration: one frozen dataclass per layer, and the loader.

Precedence is flags > environment > config file > defaults. This module never
reads ``os.environ`` or ``sys.argv`` itself: the CLI passes them in, so every
layer is testable with plain dictionaries.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_API_PORT = 8764
DEFAULT_MESH_PORT = 8765
DEFAULT_STATE_DIR = "~/.local/state/meshd"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A bad setting; ``key`` names it as it is spelled in the config file."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127.")


@dataclass(frozen=True)
class ModelSpec:
    """One GGUF file to serve in-process with llama.cpp."""

    path: Path
    id: str
    aliases: tuple[str, ...] = ()
    n_ctx: int = 4096
    bundled: bool = False
    # Layer split across trusted peers (docs/split.md): "off" serves it here only;
    # "auto" splits it when it does not fit split.memory_budget_mb; "always" splits
    # it whenever a peer can take layers.
    split: str = "off"


@dataclass(frozen=True)
class ApiConfig:
    listen: ListenAddress = ListenAddress("127.0.0.1", DEFAULT_API_PORT)
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class AuthConfig:
    """API keys on ``/v1/*`` (docs/auth.md).

    Keys are required once the key file holds any key (revoked ones count, so
    revoking the last key never opens the node), or always with
    ``require_keys``. A node whose API listens beyond loopback refuses to start
    without a key unless ``insecure_no_auth``, which turns key checks off.
    """

    require_keys: bool = False
    insecure_no_auth: bool = False
    default_max_tokens: int = 1024  # reserved against token quotas when a request sets no max_tokens


@dataclass(frozen=True)
class ReceiptsConfig:
    enabled: bool = True
    max_file_bytes: int = 64 * 1024 * 1024  # rotate receipts-N.jsonl beyond this size
    flush_interval_s: float = 1.0  # receipts are fsync'd in batches this often


@dataclass(frozen=True)
class ServingConfig:
    """How local models execute requests."""

    max_queue: int = 16  # waiting requests per model, beyond the one running
    n_threads: int = 0  # 0: let llama.cpp pick
    retry_after_s: int = 2


@dataclass(frozen=True)
class MeshConfig:
    # QUIC over UDP. All interfaces by default: every connection is mutually
    # authenticated, and untrusted peers get nothing beyond the hello.
    listen: ListenAddress = ListenAddress("0.0.0.0", DEFAULT_MESH_PORT)
    discovery: bool = True
    peers: tuple[ListenAddress, ...] = ()
    heartbeat_s: float = 5.0
    peer_timeout_s: float = 15.0  # silence after which a connected peer is marked down
    # QUIC engine ("auto": qh3 when installed and usable, else aioquic) and the
    # transport knobs of docs/transport.md; None keeps the transport's default.
    engine: str = "auto"
    max_datagram_size: int | None = None
    udp_buffer_bytes: int | None = None
    max_stream_data: int | None = None
    max_data: int | None = None
    pmtu_probe: bool = False
    busy_poll_us: int | None = None


STRATEGIES = ("local-first", "least-loaded", "lowest-latency")
DATA_CLASSES = ("public", "internal", "confidential", "secret")


@dataclass(frozen=True)
class RoutingConfig:
    strategy: str = "local-first"
    default_data_class: str = "internal"
    # Node ids allowed to receive `confidential` requests; `secret` never leaves the node.
    confidential_peers: tuple[str, ...] = ()
    max_attempts: int = 3  # candidates tried for one request (failover bound)
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 30.0
    first_token_timeout_s: float = 30.0  # an attempt that stays silent this long fails over
    stall_timeout_s: float = 30.0  # a serving peer silent this long mid-stream is given up
    request_deadline_s: float = 600.0  # the whole budget until the first token, failovers included


KV_WIRE_FORMATS = ("raw", "q8_0")


@dataclass(frozen=True)
class KvCacheConfig:
    """Per-node prefix cache and KV-cache mobility (docs/kvcache.md).

    Off by default: a request that restores a cached prefix decodes only its
    new suffix, and llama.cpp is not bit-for-bit batch-invariant in every
    configuration, so a cached request can (rarely) continue differently from
    a fresh one at temperature 0. Turning it on trades that for speed.
    """

    enabled: bool = False
    max_bytes: int = 512 * 1024 * 1024  # all models' cached conversations together (LRU beyond)
    min_tokens: int = 16  # shorter shared prefixes are not worth an import
    wire_format: str = "raw"  # q8_0: half the bytes on the wire, lossy (see docs/kvcache.md)
    drain_on_sigterm: bool = False  # SIGTERM hands cached conversations to peers first, like meshctl drain
    # Link throughput assumed for a peer until a cache transfer with it has been measured;
    # a pull is chosen when bytes / throughput beats re-prefilling the tokens it covers.
    link_mb_s: float = 100.0


SPLIT_MODES = ("off", "auto", "always")


@dataclass(frozen=True)
class SplitConfig:
    """Layer split over the mesh (docs/split.md): this node as host and as worker."""

    # Serve layers for peers trusted with `tensor`: a llama.cpp RPC server in a child
    # process bound to 127.0.0.1, reachable only through the authenticated QUIC tunnel.
    worker: bool = True
    # Model memory this node may use for split models' layers, as host or worker;
    # 0: what the system reports free, less a reserve.
    memory_budget_mb: int = 0
    worker_idle_s: float = 60.0  # an unused worker process is stopped after this long
    n_threads: int = 0  # the worker's compute threads; 0: the node's CPU count
    plan_wait_s: float = 20.0  # how long a split model waits for peers before it reports why it cannot load
    speed_gbs: float = 0.0  # the speed this node advertises for planning; 0: measured at start


@dataclass(frozen=True)
class AdminSettings:
    group: str | None = None  # members may use meshctl: the socket becomes 0660


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path = Path(DEFAULT_STATE_DIR).expanduser()
    name: str = ""  # display name; empty means the host name
    admin: AdminSettings = field(default_factory=AdminSettings)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    # Other backends, built from [[upstreams]], [[vllm]] and [[mlx]] tables.
    upstreams: tuple[Any, ...] = ()
    vllm: tuple[Any, ...] = ()
    mlx: tuple[Any, ...] = ()
    api: ApiConfig = field(default_factory=ApiConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    receipts: ReceiptsConfig = field(default_factory=ReceiptsConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    kvcache: KvCacheConfig = field(default_factory=KvCacheConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    models: tuple[ModelSpec, ...] = ()
    default_model: bool = True
    log_level: str = "info"
    log_format: str = "text"
    shutdown_grace_s: float = 10.0


# --- value parsers: each takes (key, raw) and returns the typed value ---------


def parse_listen(key: str, raw: Any) -> ListenAddress:
    if not isinstance(raw, str):
        raise ConfigError(key, f"expected HOST:PORT, got {raw!r}")
    host, sep, port_text = raw.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(key, f"expected HOST:PORT, got {raw!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} is out of range 0-65535")
    return ListenAddress(host, port)


def _parse_int(minimum: int) -> Callable[[str, Any], int]:
    def parse(key: str, raw: Any) -> int:
        if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(key, f"expected an integer, got {raw!r}")
        if raw < minimum:
            raise ConfigError(key, f"must be at least {minimum}, got {raw}")
        return raw

    return parse


def _parse_float(key: str, raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(key, f"must not be negative, got {raw!r}")
    return value


def _parse_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(key, f"expected true or false, got {raw!r}")


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(key: str, raw: Any) -> str:
        if not isinstance(raw, str) or raw.lower() not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}; got {raw!r}")
        return raw.lower()

    return parse


def _parse_path(key: str, raw: Any) -> Path:
    if not isinstance(raw, (str, os.PathLike)) or not str(raw):
        raise ConfigError(key, f"expected a path, got {raw!r}")
    return Path(raw).expanduser()


def _parse_peer_list(key: str, raw: Any) -> tuple[ListenAddress, ...]:
    items = [x.strip() for x in raw.split(",")] if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)):
        raise ConfigError(key, f"expected a list of HOST:PORT, got {raw!r}")
    return tuple(parse_listen(key, item) for item in items if item)


def _parse_id_list(key: str, raw: Any) -> tuple[str, ...]:
    from identity import InvalidNodeId, NodeId

    items = [x.strip() for x in raw.split(",")] if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)):
        raise ConfigError(key, f"expected a list of node ids, got {raw!r}")
    try:
        return tuple(str(NodeId.parse(str(item))) for item in items if item)
    except InvalidNodeId as exc:
        raise ConfigError(key, str(exc)) from None


def _parse_name(key: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip() or len(raw) > 64 or any(c in raw for c in "\n\r\t"):
        raise ConfigError(key, f"expected a short single-line name, got {raw!r}")
    return raw.strip()


# key -> (parser, environment variable or None)
SETTINGS: dict[str, tuple[Callable[[str, Any], Any], str | None]] = {
    "state_dir": (_parse_path, "MESHD_STATE_DIR"),
    "name": (_parse_name, "MESHD_NAME"),
    "admin.group": (_parse_name, "MESHD_ADMIN_GROUP"),
    "log_level": (_parse_choice(LOG_LEVELS), "MESHD_LOG_LEVEL"),
    "log_format": (_parse_choice(LOG_FORMATS), "MESHD_LOG_FORMAT"),
    "default_model": (_parse_bool, None),
    "no_default_model": (_parse_bool, "MESHD_NO_DEFAULT_MODEL"),
    "shutdown_grace_s": (_parse_float, "MESHD_SHUTDOWN_GRACE"),
    "api.listen": (parse_listen, "MESHD_API_LISTEN"),
    "api.max_body_bytes": (_parse_int(1024), "MESHD_API_MAX_BODY_BYTES"),
    "serving.max_queue": (_parse_int(0), "MESHD_MAX_QUEUE"),
    "mesh.listen": (parse_listen, "MESHD_MESH_LISTEN"),
    "mesh.discovery": (_parse_bool, None),
    "no_discovery": (_parse_bool, "MESHD_NO_DISCOVERY"),
    "mesh.peers": (_parse_peer_list, "MESHD_PEERS"),
    "mesh.heartbeat_s": (_parse_float, "MESHD_MESH_HEARTBEAT_S"),
    "routing.strategy": (_parse_choice(STRATEGIES), "MESHD_ROUTING_STRATEGY"),
    "routing.default_data_class": (_parse_choice(DATA_CLASSES), "MESHD_DEFAULT_DATA_CLASS"),
    "routing.confidential_peers": (_parse_id_list, "MESHD_CONFIDENTIAL_PEERS"),
    "routing.max_attempts": (_parse_int(1), None),
    "routing.breaker_threshold": (_parse_int(1), None),
    "routing.breaker_cooldown_s": (_parse_float, None),
    "routing.first_token_timeout_s": (_parse_float, None),
    "routing.stall_timeout_s": (_parse_float, None),
    "routing.request_deadline_s": (_parse_float, None),
    "mesh.peer_timeout_s": (_parse_float, "MESHD_MESH_PEER_TIMEOUT_S"),
    "serving.n_threads": (_parse_int(0), "MESHD_N_THREADS"),
    "serving.retry_after_s": (_parse_int(1), None),
    "auth.require_keys": (_parse_bool, "MESHD_REQUIRE_KEYS"),
    "auth.insecure_no_auth": (_parse_bool, "MESHD_INSECURE_NO_AUTH"),
    "auth.default_max_tokens": (_parse_int(1), None),
    "receipts.enabled": (_parse_bool, "MESHD_RECEIPTS"),
    "receipts.max_file_bytes": (_parse_int(4096), None),
    "receipts.flush_interval_s": (_parse_float, None),
    "kvcache.enabled": (_parse_bool, "MESHD_KVCACHE"),
    "kvcache.max_bytes": (_parse_int(1024 * 1024), "MESHD_KVCACHE_MAX_BYTES"),
    "kvcache.min_tokens": (_parse_int(1), None),
    "kvcache.wire_format": (_parse_choice(KV_WIRE_FORMATS), "MESHD_KVCACHE_WIRE_FORMAT"),
    "kvcache.drain_on_sigterm": (_parse_bool, "MESHD_KVCACHE_DRAIN_ON_SIGTERM"),
    "kvcache.link_mb_s": (_parse_float, None),
    "mesh.engine": (_parse_choice(("auto", "aioquic", "qh3")), "MESHD_QUIC_ENGINE"),
    "mesh.max_datagram_size": (_parse_int(1200), "MESHD_QUIC_MAX_DATAGRAM_SIZE"),
    "mesh.udp_buffer_bytes": (_parse_int(65536), None),
    "mesh.max_stream_data": (_parse_int(65536), None),
    "mesh.max_data": (_parse_int(65536), None),
    "mesh.pmtu_probe": (_parse_bool, None),
    "mesh.busy_poll_us": (_parse_int(0), "MESHD_QUIC_BUSY_POLL_US"),
    "split.worker": (_parse_bool, "MESHD_SPLIT_WORKER"),
    "split.memory_budget_mb": (_parse_int(0), "MESHD_SPLIT_MEMORY_BUDGET_MB"),
    "split.worker_idle_s": (_parse_float, None),
    "split.n_threads": (_parse_int(0), None),
    "split.plan_wait_s": (_parse_float, None),
    "split.speed_gbs": (_parse_float, None),
}
MODEL_KEYS = {"path", "id", "aliases", "alias", "n_ctx", "split"}
BACKEND_TABLES = ("upstreams", "vllm", "mlx")
MODELS_ENV = "MESHD_MODEL"  # os.pathsep-separated list of [ALIAS=]PATH


def parse_model_arg(key: str, raw: str) -> dict[str, Any]:
    """``[ALIAS=]PATH`` as given to ``--model`` or ``MESHD_MODEL``."""
    alias, sep, path = raw.partition("=")
    if not sep or "/" in alias or not alias:
        alias, path = "", raw
    if not path:
        raise ConfigError(key, f"expected [ALIAS=]PATH, got {raw!r}")
    entry: dict[str, Any] = {"path": path}
    if alias:
        entry["aliases"] = [alias]
    return entry


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML file into flat ``{"api.listen": ...}`` settings."""
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    models = table.pop("models", [])
    backend_tables = {name: table.pop(name, []) for name in BACKEND_TABLES}
    flat = _flatten(table)
    for name, tables in backend_tables.items():
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise ConfigError(name, f"expected an array of tables ([[{name}]])")
        if tables:
            flat[name] = tables
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ConfigError("models", "expected an array of tables ([[models]])")
    flat["models"] = models
    return flat


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, (_, var) in SETTINGS.items():
        if var and var in env:
            values[key] = env[var]
    if env.get(MODELS_ENV):
        values["models"] = [
            parse_model_arg(MODELS_ENV, item) for item in env[MODELS_ENV].split(os.pathsep) if item
        ]
    return values


def _model_spec(index: int, raw: Mapping[str, Any]) -> ModelSpec:
    key = f"models[{index}]"
    unknown = set(raw) - MODEL_KEYS
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown setting")
    if "path" not in raw:
        raise ConfigError(f"{key}.path", "is required")
    path = _parse_path(f"{key}.path", raw["path"])
    if not path.is_file():
        raise ConfigError(f"{key}.path", f"file not found: {path}")
    aliases = raw.get("aliases", [])
    if "alias" in raw:
        aliases = [*aliases, raw["alias"]]
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"{key}.aliases", f"expected a list of names, got {aliases!r}")
    model_id = raw.get("id", path.stem)
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"{key}.id", f"expected a name, got {model_id!r}")
    n_ctx = _parse_int(0)(f"{key}.n_ctx", raw.get("n_ctx", ModelSpec.n_ctx))
    split = _parse_choice(SPLIT_MODES)(f"{key}.split", raw.get("split", ModelSpec.split))
    return ModelSpec(path=path, id=model_id, aliases=tuple(aliases), n_ctx=n_ctx, split=split)


def _table_to(cls: type, key: str, table: Mapping[str, Any]) -> Any:
    """A frozen config dataclass from one TOML table: unknown keys are errors, lists become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - names
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown setting")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(key, str(exc)) from None


def _backend_configs(merged: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    if merged.get("upstreams"):
        from .backends.upstream import parse_upstream_table

        out["upstreams"] = tuple(parse_upstream_table(f"upstreams[{i}]", t, env)
                                 for i, t in enumerate(merged["upstreams"]))
    if merged.get("vllm"):
        from .backends.vllm import VllmConfig

        out["vllm"] = tuple(_table_to(VllmConfig, f"vllm[{i}]", t) for i, t in enumerate(merged["vllm"]))
    if merged.get("mlx"):
        from .backends.mlx import MlxConfig

        out["mlx"] = tuple(_table_to(MlxConfig, f"mlx[{i}]", t) for i, t in enumerate(merged["mlx"]))
    return out


def build_config(*layers: Mapping[str, Any], env: Mapping[str, str] | None = None) -> DaemonConfig:
    """Merge flat setting layers (lowest precedence first) into a DaemonConfig."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    values: dict[str, Any] = {}
    for key, raw in merged.items():
        if key == "models" or key in BACKEND_TABLES:
            continue
        if key not in SETTINGS:
            raise ConfigError(key, "unknown setting")
        values[key] = SETTINGS[key][0](key, raw)

    default_model = values.get("default_model", True) and not values.get("no_default_model", False)
    models = tuple(_model_spec(i, m) for i, m in enumerate(merged.get("models", [])))
    heartbeat = values.get("mesh.heartbeat_s", MeshConfig.heartbeat_s)
    if not 0 < heartbeat < values.get("mesh.peer_timeout_s", MeshConfig.peer_timeout_s):
        raise ConfigError("mesh.heartbeat_s", "must be positive and shorter than mesh.peer_timeout_s")
    seen: set[str] = set()
    for index, spec in enumerate(models):
        for name in (spec.id, *spec.aliases):
            if name in seen:
                raise ConfigError(f"models[{index}]", f"model name {name!r} is used twice")
            seen.add(name)

    def section(cls: type, prefix: str) -> Any:
        kwargs = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
        return cls(**kwargs)

    top = {k: v for k, v in values.items()
           if "." not in k and k not in ("default_model", "no_default_model", "no_discovery")}
    if values.get("no_discovery"):
        values["mesh.discovery"] = False
    return dataclasses.replace(
        DaemonConfig(),
        **top,
        api=section(ApiConfig, "api."),
        admin=section(AdminSettings, "admin."),
        mesh=section(MeshConfig, "mesh."),
        routing=section(RoutingConfig, "routing."),
        serving=section(ServingConfig, "serving."),
        auth=section(AuthConfig, "auth."),
        receipts=section(ReceiptsConfig, "receipts."),
        kvcache=section(KvCacheConfig, "kvcache."),
        split=section(SplitConfig, "split."),
        models=models,
        default_model=default_model,
        **_backend_configs(merged, env or {}),
    )


def load_config(
    config_file: Path | None,
    env: Mapping[str, str],
    flags: Mapping[str, Any],
) -> DaemonConfig:
    """Defaults < file < env < flags. ``flags`` uses the same flat keys."""
    file_layer = read_config_file(config_file) if config_file else {}
    return build_config(file_layer, read_env(env), flags, env=env)


__all__ = [
    "AdminSettings",
    "ApiConfig",
    "AuthConfig",
    "ConfigError",
    "DaemonConfig",
    "DEFAULT_API_PORT",
    "KvCacheConfig",
    "ListenAddress",
    "MeshConfig",
    "RoutingConfig",
    "ModelSpec",
    "ReceiptsConfig",
    "ServingConfig",
    "SplitConfig",
    "build_config",
    "load_config",
    "parse_listen",
    "parse_model_arg",
]
