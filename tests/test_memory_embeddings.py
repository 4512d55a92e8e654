"""Offline embeddings: the real default model (no download), and pluggable alternatives."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings

from keel.errors import UserError
from keel.memory import ChromaEmbeddings, ChromaStore, MiniLMEmbeddings, default_index

FACTS = {
    "tz": "The user lives in Berlin and works in Central European Time.",
    "diet": "She is vegetarian and allergic to peanuts.",
    "pet": "Her dog is a border collie named Pixel.",
    "lang": "She prefers answers in German, short and direct.",
    "job": "She is a backend engineer who writes Rust and Python.",
}


# Texts whose torch-path vectors are recorded in tests/data/minilm_torch.json: plain, short,
# non-Latin, empty, and one past the 256-token truncation.
REFERENCE_TEXTS = [
    "The cat sits on the mat.",
    "Refunds for damaged items are issued in full within 30 days of delivery.",
    "a",
    "Ünïcödé テキスト 中文 🚀 résumé",
    "",
    " ".join(f"word{i}" for i in range(400)),
    "Order A1001: ceramic teapot, total $42.50, delivered.",
]
REFERENCE = Path(__file__).parent / "data" / "minilm_torch.json"
NO_TORCH = (
    "the torch path is not installed (pip install 'langgraph-keel[embeddings-torch]'): the onnx "
    "vectors are checked against the recorded torch vectors only"
)


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbeddings:
    return MiniLMEmbeddings()


def test_minilm_is_a_real_sentence_model(minilm: MiniLMEmbeddings) -> None:
    a, b, c = minilm.embed_documents(
        ["The cat sits on the mat.", "A cat is sitting on a mat.", "Quarterly tax filing deadline."]
    )
    assert len(a) == 384 and sum(x * x for x in a) == pytest.approx(1.0, abs=1e-4)
    assert _cos(a, b) > 0.9
    assert _cos(a, c) < 0.2
    assert minilm.embed_query("The cat sits on the mat.") == pytest.approx(a, abs=1e-5)


def test_semantic_search_with_the_default_model(tmp_path: Path) -> None:
    store = ChromaStore(path=tmp_path, index=default_index())
    ns = ("memories", "acme", "u1")
    store.batch([])  # an empty batch is fine
    for key, text in FACTS.items():
        store.put(ns, key, {"text": text})
    for i in range(150):  # padding, so the right answer has competition
        store.put(
            ("memories", "acme", "u2"),
            f"n{i}",
            {"text": f"Meeting note {i} about budget item {i % 7}."},
        )
    asks = {
        "what timezone is she in?": "tz",
        "food restrictions": "diet",
        "what is the name of her pet?": "pet",
        "which language should I reply in": "lang",
        "programming languages she uses": "job",
    }
    for query, key in asks.items():
        found = store.search(ns, query=query, limit=2)
        assert found[0].key == key, (query, [(i.key, i.score) for i in found])
    assert store.client.get_collection("keel-keel-catalog").metadata["keel:model"] == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )


def _fresh_python(
    code: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_model_loads_with_no_network(tmp_path: Path) -> None:
    # A fresh interpreter with every proxy pointed at a dead port: a download attempt would fail.
    code = (
        "from keel.memory import MiniLMEmbeddings;"
        "print(len(MiniLMEmbeddings().embed_query('hello')))"
    )
    dead = "http://127.0.0.1:9"
    env = dict(os.environ, HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead)
    env.pop("HF_HUB_OFFLINE", None)
    out = _fresh_python(code, tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "384"


def test_a_store_on_the_default_model_never_touches_the_network(tmp_path: Path) -> None:
    """The README's memory example, end to end, in a fresh interpreter whose every socket is
    refused, with HF_HUB_OFFLINE and ANONYMIZED_TELEMETRY unset: no model download (keel's,
    or Chroma's default embedding function's), no telemetry."""
    from test_cli_agent import GUARDED

    code = GUARDED + textwrap.dedent(
        """
        from keel.memory import ChromaStore, default_index

        store = ChromaStore(path="chroma", index=default_index())
        ns = ("memories", "acme", "alice")
        store.put(ns, "drink", {"text": "Alice drinks green tea every morning"})
        store.put(ns, "office", {"text": "Alice works from the Berlin office"})
        print(store.search(ns, query="What beverage does she like?", limit=1)[0].key)
        """
    )
    unset = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ANONYMIZED_TELEMETRY")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = _fresh_python(code, tmp_path, env)
    assert "NETWORK ATTEMPT" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["drink"]


class Vowels(EmbeddingFunction[Documents]):
    """A Chroma embedding function (deterministic, for tests)."""

    def __init__(self) -> None:
        pass

    def __call__(self, input: Documents) -> Embeddings:
        import numpy as np

        return [np.array([t.count(v) + 0.1 for v in "aeiou"], dtype=np.float32) for t in input]

    @staticmethod
    def name() -> str:
        return "vowels-v1"

    def get_config(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> Vowels:
        return Vowels()


def test_a_chroma_embedding_function_plugs_in(tmp_path: Path) -> None:
    store = ChromaStore(path=tmp_path, index={"dims": 5, "embed": Vowels()})  # type: ignore[typeddict-item]
    store.put(("d",), "a", {"text": "aaaa"})
    store.put(("d",), "u", {"text": "uuuu"})
    assert next(i.key for i in store.search(("d",), query="aaa")) == "a"
    assert store.model == "vowels-v1"
    assert ChromaEmbeddings(Vowels()).embed_query("ou") == pytest.approx([0.1, 0.1, 0.1, 1.1, 1.1])


def test_bad_embedding_arguments_say_what_to_do() -> None:
    with pytest.raises(UserError, match="batch_size"):
        MiniLMEmbeddings(batch_size=0)
    with pytest.raises(UserError, match="Chroma embedding function"):
        ChromaEmbeddings("not a function")  # type: ignore[arg-type]


def test_the_onnx_path_gives_the_vectors_torch_gave(minilm: MiniLMEmbeddings) -> None:
    recorded = json.loads(REFERENCE.read_text())
    assert recorded["texts"] == REFERENCE_TEXTS
    got = minilm.embed_documents(REFERENCE_TEXTS)
    for text, mine, theirs in zip(REFERENCE_TEXTS, got, recorded["vectors"], strict=True):
        assert _cos(mine, theirs) >= 0.9999, text[:40]


def test_the_onnx_path_equals_the_torch_path_live(minilm: MiniLMEmbeddings) -> None:
    pytest.importorskip("sentence_transformers", reason=NO_TORCH)
    torch = MiniLMEmbeddings(backend="torch")
    texts = [*REFERENCE_TEXTS, *FACTS.values()]
    for text, a, b in zip(
        texts, minilm.embed_documents(texts), torch.embed_documents(texts), strict=True
    ):
        assert _cos(a, b) >= 0.9999, text[:40]


def test_padding_does_not_change_a_vector(minilm: MiniLMEmbeddings) -> None:
    # dynamic padding: a short text batched with a long one gets the vector it gets alone
    texts = ["short", " ".join(["padding"] * 200), "a bit longer text than the first"]
    batched = MiniLMEmbeddings(batch_size=3).embed_documents(texts)
    for text, vector in zip(texts, batched, strict=True):
        assert _cos(vector, minilm.embed_query(text)) >= 0.99999


def test_the_default_path_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from keel.memory import MiniLMEmbeddings;"
        "MiniLMEmbeddings().embed_query('hello');"
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers')"
        " if m in sys.modules))"
    )
    out = _fresh_python(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_backend_arguments_say_what_to_do() -> None:
    with pytest.raises(UserError, match="must be 'onnx' or 'torch', got 'tf'"):
        MiniLMEmbeddings(backend="tf")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="needs backend='torch'"):
        MiniLMEmbeddings(device="cuda")
