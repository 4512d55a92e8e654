"""LangSmith tracing against a local stand-in for the LangSmith API (a real HTTP server).

The stand-in records every request it receives. Seeded PII must never reach it; the run's
metadata must; a stand-in answering 500 must not fail the run; with no key nothing is sent.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import langsmith.run_trees
import langsmith.utils
import pytest
from langchain_core.tracers.langchain import wait_for_all_tracers

from keel import RunContext, build_agent
from keel.evals import ScriptedChatModel
from keel.evals.scripted import call
from keel.observe.tracing import trace_config, tracing_enabled
from keel.tools import tool

CTX = RunContext(user_id="u-trace", tenant_id="acme-tenant")
PII = ("jane.doe@example.com", "4111 1111 1111 1111", "415 555 0199")


class StandIn:
    """A threaded HTTP server on 127.0.0.1 that records requests and answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[str, str, bytes]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append((self.command, self.path, body))
                code = 200 if self.command == "GET" else recorder.status
                payload = b"{}"
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # polled every 10 ms, not 0.5 s: `shutdown()` waits for the next poll
        serve = functools.partial(self.server.serve_forever, poll_interval=0.01)
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def bodies(self) -> bytes:
        return b"\n".join(body for method, _, body in self.requests if method != "GET")

    def wait_for_posts(self, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.bodies():
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _fresh_langsmith_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """langsmith reads the environment once (lru_cache) and caches one client per process."""
    monkeypatch.setattr(langsmith.run_trees, "_CLIENT", None)
    langsmith.utils.get_env_var.cache_clear()
    langsmith.utils.get_tracer_project.cache_clear()


def _stand_in(monkeypatch: pytest.MonkeyPatch, status: int, key: str | None) -> Iterator[StandIn]:
    server = StandIn(status)
    monkeypatch.setenv("LANGSMITH_TRACING", "true")
    monkeypatch.setenv("LANGSMITH_ENDPOINT", server.url)
    monkeypatch.setenv("LANGSMITH_PROJECT", "keel-tests")
    if key is None:
        monkeypatch.delenv("LANGSMITH_API_KEY", raising=False)
        monkeypatch.delenv("LANGCHAIN_API_KEY", raising=False)
    else:
        monkeypatch.setenv("LANGSMITH_API_KEY", key)
    _fresh_langsmith_env(monkeypatch)
    try:
        yield server
    finally:
        server.close()
        langsmith.utils.get_env_var.cache_clear()
        langsmith.utils.get_tracer_project.cache_clear()


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    yield from _stand_in(monkeypatch, 200, "ls-test-key")


@pytest.fixture
def failing_stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    yield from _stand_in(monkeypatch, 500, "ls-test-key")


@pytest.fixture
def keyless_stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    yield from _stand_in(monkeypatch, 200, None)


@tool(name="lookup_customer")
def lookup_customer(email: str) -> str:
    """Find a customer by email."""
    return f"Customer {email}, card 4111 1111 1111 1111, phone +1 415 555 0199."


def _agent() -> Any:
    model = ScriptedChatModel(
        script=[
            call("lookup_customer", email="jane.doe@example.com"),
            "Found jane.doe@example.com.",
        ]
    )
    return build_agent(model, [lookup_customer], name="traced_agent")


def _run(agent: Any) -> dict[str, Any]:
    task = "Find jane.doe@example.com, card 4111 1111 1111 1111."
    result: dict[str, Any] = agent.invoke(
        {"messages": [("user", task)]}, trace_config(CTX), context=CTX
    )
    return result


def _flush(agent: Any) -> None:
    (tracer,) = agent.config["callbacks"]
    tracer.wait_for_futures()
    tracer.client.flush()


def test_traces_carry_metadata_and_no_pii(stand_in: StandIn) -> None:
    agent = _agent()
    result = _run(agent)
    assert result["outcome"]["terminated_reason"] == "completed"
    _flush(agent)
    sent = stand_in.bodies()
    for marker in (b"u-trace", b"acme-tenant", b"traced_agent", b"graph:traced_agent", b"0.1.0"):
        assert marker in sent, f"{marker!r} missing from what LangSmith received"
    assert b"default@1" in sent and b"[EMAIL]" in sent and b"[CARD]" in sent
    for secret in PII:
        assert secret.encode() not in sent, f"PII {secret!r} reached LangSmith"


@tool(name="lookup_customer")
def failing_lookup(email: str) -> str:
    """Find a customer by email."""
    raise ValueError(f"no customer {email} with card 4111 1111 1111 1111")


def _provider_error(messages: Any) -> Any:
    raise ValueError("provider refused jane.doe@example.com, phone +1 415 555 0199")


@pytest.mark.parametrize("fails", ["tool", "model"])
def test_the_error_of_a_run_that_raised_reaches_langsmith_redacted(
    stand_in: StandIn, fails: str
) -> None:
    """A tool or model that raises: its run's `error` (message and traceback) is redacted."""
    if fails == "tool":
        script: list[Any] = [call("lookup_customer", email="jane.doe@example.com"), "Sorry."]
        agent = build_agent(ScriptedChatModel(script=script), [failing_lookup], name="traced")
    else:
        agent = build_agent(ScriptedChatModel(script=[_provider_error]), [], name="traced")
    _run(agent)
    _flush(agent)
    sent = stand_in.bodies()
    assert b"ValueError" in sent and b"Traceback" in sent, "the error itself is traced"
    for secret in PII:
        assert secret.encode() not in sent, f"PII {secret!r} reached LangSmith"


def test_a_failing_langsmith_never_fails_the_run(failing_stand_in: StandIn) -> None:
    agent = _agent()
    result = _run(agent)
    assert result["outcome"]["terminated_reason"] == "completed"
    failing_stand_in.wait_for_posts()
    assert failing_stand_in.bodies(), "the tracer should have tried to send"
    result = _run(agent)
    assert result["outcome"]["terminated_reason"] == "completed"


def test_without_a_key_nothing_is_sent(keyless_stand_in: StandIn) -> None:
    assert not tracing_enabled()
    agent = _agent()
    assert _run(agent)["outcome"]["terminated_reason"] == "completed"
    wait_for_all_tracers()  # what LangSmith's client queued is sent (see the pin below)
    assert keyless_stand_in.bodies() == b""


def test_pin_langchain_posts_traces_without_a_key(keyless_stand_in: StandIn) -> None:
    """Why keel binds a silent tracer: LangChain's default tracer posts without a key."""
    from langchain_core.runnables import RunnableLambda

    RunnableLambda(lambda x: x).invoke("jane.doe@example.com")
    wait_for_all_tracers()  # sent by now: what the test without a key waits for
    assert b"jane.doe@example.com" in keyless_stand_in.bodies()


def test_pin_langsmith_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why `sanitizing_client` passes the endpoint and key itself."""
    langsmith.utils.get_env_var.cache_clear()
    monkeypatch.setenv("LANGSMITH_ENDPOINT", "http://127.0.0.1:1")
    assert langsmith.utils.get_env_var("ENDPOINT") == "http://127.0.0.1:1"
    monkeypatch.setenv("LANGSMITH_ENDPOINT", "http://127.0.0.1:2")
    assert langsmith.utils.get_env_var("ENDPOINT") == "http://127.0.0.1:1"  # cached
    langsmith.utils.get_env_var.cache_clear()


@pytest.mark.parametrize("mode", ["messages", "updates"])
def test_a_streamed_run_reaches_langsmith_redacted(stand_in: StandIn, mode: str) -> None:
    """Streamed, the model's tokens pass through the tracer (a `new_token` event per run): an
    answer that starts with PII (the event's token) reaches LangSmith redacted all the same."""
    answer = "jane.doe@example.com is hers, card 4111 1111 1111 1111."
    model = ScriptedChatModel(
        script=[call("lookup_customer", email="jane.doe@example.com"), answer]
    )
    agent = build_agent(model, [lookup_customer], name="traced_agent")
    task = "Find jane.doe@example.com, card 4111 1111 1111 1111."
    for _ in agent.stream(
        {"messages": [("user", task)]}, trace_config(CTX), context=CTX, stream_mode=mode
    ):
        pass
    _flush(agent)
    sent = stand_in.bodies()
    assert b"[EMAIL]" in sent, "the run itself is traced"
    for secret in PII:
        assert secret.encode() not in sent, f"PII {secret!r} reached LangSmith"
