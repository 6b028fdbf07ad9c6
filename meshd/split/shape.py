"""How a GGUF model's weights divide into layers: what the planner places.

Read from the tensor table (no weights are loaded): ``blk.N.*`` tensors are
layer N's; the output head (``output.weight``, or a copy of the token
embeddings when the model ties them, and ``output_norm``) runs on the device
of the last layer, which llama.cpp places after every offloaded layer; the
rest (token embeddings) stays with the host that runs the llama context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError

_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    layer_bytes: int  # the largest layer's weights (layers of one model are near-identical)
    other_bytes: int  # weights that never leave the host
    kv_bytes_per_token: int = 0  # one layer's f16 K and V for one token of context
    output_bytes: int = 0  # the output head: on the host, or on the last worker when layers are split

    def layer_cost(self, n_ctx: int) -> int:
        """Memory one layer takes where it runs: its weights and its KV cache."""
        return self.layer_bytes + self.kv_bytes_per_token * n_ctx

    def total_bytes(self, n_ctx: int) -> int:
        return self.other_bytes + self.output_bytes + self.n_layer * self.layer_cost(n_ctx)

    def to_dict(self) -> dict[str, int]:
        return {"n_layer": self.n_layer, "layer_bytes": self.layer_bytes, "other_bytes": self.other_bytes,
                "output_bytes": self.output_bytes, "kv_bytes_per_token": self.kv_bytes_per_token}


def model_shape(path: Path) -> ModelShape:
    """Blocking (reads the GGUF header and tensor table)."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - gguf comes with meshd[llama]
        raise BackendError("reading a model's layers needs the gguf package (meshd[llama])") from exc
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot read {path}: {exc}", code="model_load_failed") from exc
    layers: dict[int, int] = {}
    other: dict[str, int] = {}
    for tensor in reader.tensors:
        match = _BLOCK.match(tensor.name)
        if match:
            index = int(match.group(1))
            layers[index] = layers.get(index, 0) + int(tensor.n_bytes)
        else:
            other[tensor.name] = int(tensor.n_bytes)
    if not layers:
        raise BackendError(f"{path} has no blk.N layers: it cannot be split", code="split_unsupported")
    # Tied embeddings: the output head is a second copy of the token embeddings.
    head = other.pop("output.weight", other.get("token_embd.weight", 0)) + other.pop("output_norm.weight", 0)
    return ModelShape(n_layer=max(layers) + 1, layer_bytes=max(layers.values()), other_bytes=sum(other.values()),
                      kv_bytes_per_token=_kv_bytes_per_token(reader), output_bytes=head)


def _kv_bytes_per_token(reader: object) -> int:
    """2 (K and V) x f16 x the KV width, from the architecture's attention metadata; 0 if absent."""
    def value(key: str) -> int | None:
        field = reader.fields.get(key)  # type: ignore[attr-defined]
        if field is None or not field.data:
            return None
        return int(field.parts[field.data[0]][0])

    arch_field = reader.fields.get("general.architecture")  # type: ignore[attr-defined]
    if arch_field is None:
        return 0
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", "replace")
    n_embd = value(f"{arch}.embedding_length")
    n_head = value(f"{arch}.attention.head_count")
    n_head_kv = value(f"{arch}.attention.head_count_kv") or n_head
    if not n_embd or not n_head or not n_head_kv:
        return 0
    return 2 * 2 * (n_embd * n_head_kv // n_head)


__all__ = ["ModelShape", "model_shape"]
