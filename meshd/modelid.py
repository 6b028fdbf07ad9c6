"""Model identity: what a served model *is*, independent of what it is called.

A ``ModelDescriptor`` travels in signed capability announcements (as msgpack,
through ``to_dict``/``from_dict``), so two nodes can tell whether their
"llama3" is the same file. Every field that cannot be read from the model
itself is ``None`` (unknown), never guessed.

Sources:
- GGUF files, read with ``gguf.GGUFReader``: architecture, family, parameter
  count (from tensor shapes), quantization (``general.file_type``, else the
  dominant tensor type), context length, tokenizer hash, file sha256.
- Hugging Face / MLX directories: ``config.json``, safetensors headers,
  ``tokenizer.json``.
- Upstream servers: their ``/v1/models`` entry (vLLM's ``max_model_len``,
  llama-server's ``meta``) and Ollama's ``/api/tags`` details.

Hashing a multi-GB file happens once: ``FileFactsCache`` keeps the sha256 and
the GGUF facts in a JSON file in the state dir, keyed by path, size and mtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from identity import atomic_write

log = logging.getLogger(__name__)

CACHE_FILE_NAME = "model-facts.json"
CACHE_VERSION = 1
GGUF_TOKENIZER_SCHEME = "gguf-tok-v1"
HF_TOKENIZER_SCHEME = "hf-tok-v1"
_HASH_CHUNK = 4 * 1024 * 1024


class DescriptorError(ValueError):
    """A descriptor (e.g. from a peer's announcement) does not have the expected shape."""

    code = "invalid_model_descriptor"


@dataclass(frozen=True)
class ModelDescriptor:
    """What one served model is. ``None`` means unknown, never "probably"."""

    id: str
    aliases: tuple[str, ...] = ()
    backend: str | None = None  # "llama.cpp", "upstream", "vllm", "mlx"
    format: str | None = None  # "gguf", "safetensors"
    name: str | None = None  # the model's own display name (general.name)
    family: str | None = None  # e.g. "smollm2", "llama"
    architecture: str | None = None  # e.g. "llama", "qwen2"
    parameter_count: int | None = None
    size_label: str | None = None  # as the model states it ("135M", "8.0B"): not a count
    quantization: str | None = None  # e.g. "Q4_1", "BF16", "mlx-q4-g64"
    context_length: int | None = None
    embedding_length: int | None = None
    tokenizer_hash: str | None = None  # "<scheme>:<sha256 hex>"; schemes do not compare
    file_sha256: str | None = None
    file_size: int | None = None
    upstream_model: str | None = None  # the name an upstream server uses for it

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (str, int, None, list), ready for msgpack or JSON."""
        data = asdict(self)
        data["aliases"] = list(self.aliases)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelDescriptor:
        """Validate and build; unknown keys are ignored so newer peers stay readable."""
        if not isinstance(data, Mapping):
            raise DescriptorError(f"a model descriptor must be a map, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            values[f.name] = _check_field(f.name, data[f.name])
        if "id" not in values:
            raise DescriptorError("a model descriptor needs an 'id'")
        return cls(**values)

    def same_model(self, other: ModelDescriptor) -> bool:
        """True when both describe the same weights.

        By file sha256 when both are known. Otherwise only when every identity
        field (architecture, parameter count, quantization, tokenizer hash) is
        known on both sides and equal: unknown is never "the same".
        """
        if self.file_sha256 is not None and other.file_sha256 is not None:
            return self.file_sha256 == other.file_sha256
        keys = ("architecture", "parameter_count", "quantization", "tokenizer_hash")
        mine = [getattr(self, k) for k in keys]
        theirs = [getattr(other, k) for k in keys]
        if any(v is None for v in (*mine, *theirs)):
            return False
        return mine == theirs


_INT_FIELDS = {"parameter_count", "context_length", "embedding_length", "file_size"}


def _check_field(name: str, value: Any) -> Any:
    if name == "id":
        if not isinstance(value, str) or not value:
            raise DescriptorError(f"'id' must be a non-empty string, got {value!r}")
        return value
    if name == "aliases":
        if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
            raise DescriptorError(f"'aliases' must be a list of strings, got {value!r}")
        return tuple(value)
    if value is None:
        return None
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DescriptorError(f"{name!r} must be a non-negative integer or null, got {value!r}")
        return value
    if not isinstance(value, str):
        raise DescriptorError(f"{name!r} must be a string or null, got {value!r}")
    return value


# --- the facts cache ---------------------------------------------------------------


class FileFactsCache:
    """sha256 (and GGUF facts) per file, remembered across restarts.

    An entry is used only while the file's size and mtime are unchanged; the
    cache file is rewritten atomically after every change. Methods are
    blocking: call them from a worker thread (``describe_*_async`` does).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.hashes_computed = 0  # how many files were actually read end to end
        self._entries: dict[str, dict[str, Any]] = self._read()

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> FileFactsCache:
        return cls(state_dir / CACHE_FILE_NAME)

    def _read(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("model facts cache unreadable; starting afresh", extra={"fields": {"path": str(self.path), "error": str(exc)}})
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
            return {}
        return {k: v for k, v in data["files"].items() if isinstance(v, dict)}

    def _write(self) -> None:
        if self.path is None:
            return
        body = json.dumps({"version": CACHE_VERSION, "files": self._entries}, indent=1, sort_keys=True)
        try:
            atomic_write(self.path, body.encode())
        except OSError as exc:
            # A cache that cannot be written costs a re-hash next start, nothing more.
            log.warning("cannot write the model facts cache", extra={"fields": {"path": str(self.path), "error": str(exc)}})

    def _entry(self, path: Path) -> tuple[str, dict[str, Any]]:
        """The entry for ``path`` if still valid, else a fresh one (stat taken now)."""
        key = str(path.resolve())
        st = path.stat()
        entry = self._entries.get(key)
        if entry is None or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return key, entry

    def sha256(self, path: Path) -> str:
        key, entry = self._entry(path)
        digest = entry.get("sha256")
        if not isinstance(digest, str):
            digest = sha256_file(path)
            self.hashes_computed += 1
            entry["sha256"] = digest
            self._entries[key] = entry
            self._write()
        return digest

    def facts(self, path: Path, kind: str, compute: Any) -> dict[str, Any]:
        """Cached ``compute(path)`` result (a JSON-able dict) under ``kind``."""
        key, entry = self._entry(path)
        value = entry.get(kind)
        if not isinstance(value, dict):
            value = compute(path)
            entry[kind] = value
            self._entries[key] = entry
            self._write()
        return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- GGUF --------------------------------------------------------------------------


def _field_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def _tokenizer_hash(reader: Any) -> str | None:
    """sha256 over every ``tokenizer.ggml.*`` field: key, value types, raw value bytes.

    The chat template is not part of it: it is not the tokenizer, and
    re-templated copies of one model should still match.
    """
    keys = sorted(k for k in reader.fields if k.startswith("tokenizer.ggml."))
    if not keys:
        return None
    digest = hashlib.sha256()
    for key in keys:
        field = reader.fields[key]
        name = key.encode()
        digest.update(struct.pack("<I", len(name)) + name)
        digest.update(struct.pack("<I", len(field.types)) + b"".join(struct.pack("<I", int(t)) for t in field.types))
        digest.update(struct.pack("<Q", len(field.data)))
        for index in field.data:
            raw = field.parts[index].tobytes()
            digest.update(struct.pack("<Q", len(raw)) + raw)
    return f"{GGUF_TOKENIZER_SCHEME}:{digest.hexdigest()}"


def _quantization(reader: Any) -> str | None:
    import gguf

    file_type = _field_value(reader, "general.file_type")
    if isinstance(file_type, int):
        try:
            name = gguf.LlamaFileType(file_type).name
        except ValueError:
            name = None
        if name is not None and name != "GUESSED":
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    weights: Counter[str] = Counter()
    for tensor in reader.tensors:
        weights[tensor.tensor_type.name] += int(tensor.n_elements)
    return weights.most_common(1)[0][0] if weights else None


def read_gguf_facts(path: Path) -> dict[str, Any]:
    """Identity facts from a GGUF file's metadata and tensor table (blocking, ~seconds)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field_value(reader, "general.architecture")

    def arch_int(suffix: str) -> int | None:
        value = _field_value(reader, f"{arch}.{suffix}") if arch else None
        return int(value) if isinstance(value, int) else None

    def text(key: str) -> str | None:
        value = _field_value(reader, key)
        return value if isinstance(value, str) and value else None

    return {
        "name": text("general.name"),
        "family": text("general.basename"),
        "architecture": arch if isinstance(arch, str) else None,
        "parameter_count": sum(int(t.n_elements) for t in reader.tensors) if reader.tensors else None,
        "size_label": text("general.size_label"),
        "quantization": _quantization(reader),
        "context_length": arch_int("context_length"),
        "embedding_length": arch_int("embedding_length"),
        "tokenizer_hash": _tokenizer_hash(reader),
    }


def describe_gguf(
    path: Path,
    *,
    model_id: str,
    aliases: tuple[str, ...] = (),
    cache: FileFactsCache | None = None,
    backend: str = "llama.cpp",
) -> ModelDescriptor:
    """Blocking: reads the GGUF and hashes the file unless the cache knows them."""
    cache = cache or FileFactsCache(None)
    facts = cache.facts(path, "gguf", read_gguf_facts)
    return ModelDescriptor(
        id=model_id,
        aliases=tuple(aliases),
        backend=backend,
        format="gguf",
        file_sha256=cache.sha256(path),
        file_size=path.stat().st_size,
        **{k: facts.get(k) for k in _GGUF_KEYS},
    )


_GGUF_KEYS = (
    "name", "family", "architecture", "parameter_count", "size_label", "quantization",
    "context_length", "embedding_length", "tokenizer_hash",
)


async def describe_gguf_async(path: Path, **kwargs: Any) -> ModelDescriptor:
    """``describe_gguf`` off the event loop."""
    return await asyncio.to_thread(lambda: describe_gguf(path, **kwargs))


# --- Hugging Face / MLX directories --------------------------------------------------


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor names, dtypes and shapes."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > 100 * 1024 * 1024:
            raise DescriptorError(f"{path}: implausible safetensors header size {size}")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def _hf_parameters(tensors: Mapping[str, Any], bits: int | None) -> int:
    """Parameter count from shapes; MLX-quantized weights are packed ``32/bits`` per uint32."""
    total = 0
    for name, info in tensors.items():
        if name.endswith((".scales", ".biases")) and bits:
            continue  # quantization bookkeeping, not parameters
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        if bits and info["dtype"] == "U32" and f"{name.removesuffix('.weight')}.scales" in tensors:
            count = count * 32 // bits
        total += count
    return total


def describe_hf_dir(
    path: Path,
    *,
    model_id: str,
    aliases: tuple[str, ...] = (),
    cache: FileFactsCache | None = None,
    backend: str = "mlx",
) -> ModelDescriptor:
    """Blocking: describe a directory with config.json + *.safetensors (+ tokenizer.json)."""
    cache = cache or FileFactsCache(None)
    config = json.loads((path / "config.json").read_text())
    weights = sorted(path.glob("*.safetensors"))
    tensors: dict[str, Any] = {}
    for file in weights:
        tensors.update(safetensors_header(file))
    quant = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
    bits = int(quant["bits"]) if quant and isinstance(quant.get("bits"), int) else None
    if quant and bits:
        quantization: str | None = f"mlx-q{bits}-g{quant.get('group_size', '?')}"
    else:
        dtypes: Counter[str] = Counter()
        for info in tensors.values():
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            dtypes[info["dtype"]] += count
        quantization = dtypes.most_common(1)[0][0] if dtypes else None
    if len(weights) == 1:
        file_sha: str | None = cache.sha256(weights[0])
    elif weights:
        # Several shards: the digest of "name sha256" lines, so one changed shard changes it.
        lines = "".join(f"{w.name} {cache.sha256(w)}\n" for w in weights)
        file_sha = hashlib.sha256(lines.encode()).hexdigest()
    else:
        file_sha = None
    tokenizer_file = path / "tokenizer.json"
    tokenizer_hash = (
        f"{HF_TOKENIZER_SCHEME}:{cache.sha256(tokenizer_file)}" if tokenizer_file.is_file() else None
    )
    architectures = config.get("architectures")
    arch = config.get("model_type")

    def opt_int(key: str) -> int | None:
        value = config.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return ModelDescriptor(
        id=model_id,
        aliases=tuple(aliases),
        backend=backend,
        format="safetensors",
        name=architectures[0] if isinstance(architectures, list) and architectures else None,
        family=None,
        architecture=arch if isinstance(arch, str) else None,
        parameter_count=_hf_parameters(tensors, bits) if tensors else None,
        quantization=quantization,
        context_length=opt_int("max_position_embeddings"),
        embedding_length=opt_int("hidden_size"),
        tokenizer_hash=tokenizer_hash,
        file_sha256=file_sha,
        file_size=sum(w.stat().st_size for w in weights) if weights else None,
    )


# --- upstream servers ----------------------------------------------------------------


def describe_upstream(
    entry: Mapping[str, Any] | None,
    *,
    model_id: str,
    upstream_model: str,
    aliases: tuple[str, ...] = (),
    backend: str = "upstream",
    ollama: Mapping[str, Any] | None = None,
) -> ModelDescriptor:
    """Describe a model an upstream lists, from what it says and nothing else.

    ``entry`` is its ``/v1/models`` item; ``ollama`` the matching ``/api/tags``
    item. Ollama's ``parameter_size`` ("8.0B") is rounded, so it becomes the
    size label, not a parameter count; its ``digest`` is a manifest digest,
    not a file sha256, so it is not used as one.
    """
    entry = entry or {}

    def opt_int(mapping: Mapping[str, Any], key: str) -> int | None:
        value = mapping.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def opt_str(mapping: Mapping[str, Any], key: str) -> str | None:
        value = mapping.get(key)
        return value if isinstance(value, str) and value else None

    meta = entry.get("meta") if isinstance(entry.get("meta"), Mapping) else {}  # llama-server
    details = ollama.get("details") if ollama and isinstance(ollama.get("details"), Mapping) else {}
    return ModelDescriptor(
        id=model_id,
        aliases=tuple(aliases),
        backend=backend,
        format=opt_str(details, "format"),
        family=opt_str(details, "family"),
        parameter_count=opt_int(meta, "n_params"),
        size_label=opt_str(details, "parameter_size"),
        quantization=opt_str(details, "quantization_level"),
        context_length=opt_int(entry, "max_model_len") or opt_int(meta, "n_ctx_train"),
        embedding_length=opt_int(meta, "n_embd"),
        upstream_model=upstream_model,
    )


__all__ = [
    "CACHE_FILE_NAME",
    "DescriptorError",
    "FileFactsCache",
    "ModelDescriptor",
    "describe_gguf",
    "describe_gguf_async",
    "describe_hf_dir",
    "describe_upstream",
    "read_gguf_facts",
    "safetensors_header",
    "sha256_file",
]
