"""A local stand-in for the LangSmith REST API: a real HTTP server with in-memory objects.

Enough of the API for what keel sends: projects (`/sessions`), datasets, examples, runs
(`/runs/multipart`, `/runs/batch`), feedback. Every request is recorded. Used by the feedback
forwarding and `keel eval --langsmith` tests; `test_tracing.StandIn` is the simpler one that
answers `{}` to everything.
"""

from __future__ import annotations

import functools
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from test_tracing import _fresh_langsmith_env

TENANT = "00000000-0000-0000-0000-000000000001"


def _now() -> str:
    return datetime.now(UTC).isoformat()


class LangSmithStandIn:
    """Records every request; keeps projects, datasets, examples, runs and feedback in memory."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self.sessions: dict[str, dict[str, Any]] = {}
        self.datasets: dict[str, dict[str, Any]] = {}
        self.examples: dict[str, dict[str, Any]] = {}
        self.feedback: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with stand_in.lock:
                    stand_in.requests.append((self.command, self.path, body))
                    code, payload = stand_in.route(
                        self.command, self.path, body, self.headers.get("Content-Type") or ""
                    )
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # polled every 10 ms, not 0.5 s: `shutdown()` waits for the next poll
        serve = functools.partial(self.server.serve_forever, poll_interval=0.01)
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self, method: str) -> list[str]:
        """The paths (without query) of the requests made with `method`."""
        return [urlparse(p).path for m, p, _ in self.requests if m == method]

    def bodies(self) -> bytes:
        return b"\n".join(body for method, _, body in self.requests if method != "GET")

    # -- the API --------------------------------------------------------------------------

    def session(self, name: str, **extra: Any) -> dict[str, Any]:
        found = [s for s in self.sessions.values() if s["name"] == name]
        if found:
            return found[0]
        sid = str(extra.pop("id", None) or uuid.uuid4())
        record = {
            "id": sid,
            "name": name,
            "start_time": _now(),
            "tenant_id": TENANT,
            "reference_dataset_id": None,
            **extra,
        }
        self.sessions[sid] = record
        return record

    def route(self, method: str, raw: str, body: bytes, ctype: str) -> tuple[int, Any]:
        url = urlparse(raw)
        path = re.sub(r"^/api/v1", "", url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        data: Any = {}
        if body and "json" in ctype:
            data = json.loads(body)
        if path == "/info":
            return 200, {"version": "0.10.0", "instance_flags": {}, "tenant_handle": "keel"}
        if path == "/sessions" and method == "POST":
            return 200, self.session(data["name"], **{k: v for k, v in data.items() if k != "name"})
        if path == "/sessions" and method == "GET":
            items = list(self.sessions.values())
            if "name" in query:
                items = [s for s in items if s["name"] == query["name"]]
            return 200, items
        found = re.fullmatch(r"/sessions/([\w-]+)", path)
        if found:
            record = self.sessions.get(found.group(1))
            if record is None:
                return 404, {"detail": "not found"}
            if method == "PATCH":
                record.update({k: v for k, v in data.items() if v is not None})
            return 200, record
        if path == "/datasets" and method == "POST":
            if any(d["name"] == data["name"] for d in self.datasets.values()):
                return 409, {"detail": "dataset already exists"}
            did = str(uuid.uuid4())
            record = {
                "id": did,
                "name": data["name"],
                "description": data.get("description"),
                "data_type": data.get("data_type", "kv"),
                "created_at": _now(),
                "modified_at": _now(),
                "tenant_id": TENANT,
            }
            self.datasets[did] = record
            return 200, record
        if path == "/datasets" and method == "GET":
            items = list(self.datasets.values())
            if "name" in query:
                items = [d for d in items if d["name"] == query["name"]]
            return 200, items
        found = re.fullmatch(r"/datasets/([\w-]+)", path)
        if found and method == "GET":
            record = self.datasets.get(found.group(1))
            return (200, record) if record is not None else (404, {"detail": "not found"})
        if path == "/examples/bulk" and method == "POST":
            return 200, [self._example(e) for e in data]
        if path == "/examples" and method == "POST":
            return 200, self._example(data)
        found = re.fullmatch(r"/v1/platform/datasets/([\w-]+)/examples", path)
        if found and method == "POST":
            return 200, self._multipart_examples(found.group(1), body, ctype)
        if path == "/examples" and method == "GET":
            items = [e for e in self.examples.values() if e["dataset_id"] == query.get("dataset")]
            offset, limit = int(query.get("offset", 0)), int(query.get("limit", 100))
            return 200, items[offset : offset + limit]
        if path == "/feedback" and method == "POST":
            self.feedback.append(data)
            return 200, data
        return 200, {}

    def _example(self, data: dict[str, Any]) -> dict[str, Any]:
        eid = str(data.get("id") or uuid.uuid4())
        record = {
            "id": eid,
            "dataset_id": str(data["dataset_id"]),
            "inputs": data.get("inputs") or {},
            "outputs": data.get("outputs") or data.get("reference_outputs"),
            "metadata": data.get("metadata"),
            "created_at": _now(),
            "modified_at": _now(),
        }
        self.examples[eid] = record
        return record

    def _multipart_examples(self, dataset_id: str, body: bytes, ctype: str) -> dict[str, Any]:
        """`POST /v1/platform/datasets/{id}/examples`: parts `<id>`, `<id>.inputs`, ..."""
        boundary = ctype.split("boundary=")[-1].strip('"').encode()
        parts: dict[str, dict[str, Any]] = {}
        for chunk in body.split(b"--" + boundary):
            head, _, content = chunk.partition(b"\r\n\r\n")
            name = re.search(rb'name="([^"]+)"', head)
            if name is None:
                continue
            key = name.group(1).decode()
            eid, _, field = key.partition(".")
            value = json.loads(content.rstrip(b"\r\n") or b"null")
            entry = parts.setdefault(eid, {"id": eid, "dataset_id": dataset_id})
            if field:
                entry[field] = value
            elif isinstance(value, dict):
                entry.update({k: v for k, v in value.items() if k not in ("id",)})
        ids = [self._example(e)["id"] for e in parts.values()]
        return {"example_ids": ids, "count": len(ids)}


def serve(monkeypatch: pytest.MonkeyPatch, key: str | None) -> Iterator[LangSmithStandIn]:
    """A stand-in with the tracing project `keel-tests`, and the environment pointing at it."""
    server = LangSmithStandIn()
    server.session("keel-tests")
    monkeypatch.setenv("LANGSMITH_ENDPOINT", server.url)
    monkeypatch.setenv("LANGSMITH_PROJECT", "keel-tests")
    monkeypatch.setenv("LANGSMITH_TRACING", "false")
    for name in ("LANGSMITH_API_KEY", "LANGCHAIN_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    if key is not None:
        monkeypatch.setenv("LANGSMITH_API_KEY", key)
    _fresh_langsmith_env(monkeypatch)
    try:
        yield server
    finally:
        server.close()


def watch_connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every socket connection the process attempts from now on (the address), recorded."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def watched(self: socket.socket, address: Any) -> Any:
        attempts.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", watched)
    return attempts
