"""Served agents at parity with embedded ones, and health over HTTP, on a real `langgraph dev`.

One `keel serve` (LangGraph's in-memory server, offline, no `--allow-blocking`) and one real
Chroma server (`chroma run`, telemetry off; embeddings by keel's offline MiniLM, never Chroma's
downloader). The server config (`tests/serve/parity-server.toml`) gives tenant initech memory on
the Chroma server and tenant hooli memory in the server's own store; its models are scripted
ones named by `package.module:attribute` (`tests/serve/parity_models.py`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from conftest import ChromaServer, free_port  # the test folder is on sys.path (rootdir)
from langgraph_sdk import get_client
from langgraph_sdk.client import LangGraphClient

from keel.memory import ChromaStore, default_index

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[1]
SERVER_CONFIG = ROOT / "tests" / "serve" / "parity-server.toml"
FORGED = {"user_id": "mallory", "tenant_id": "hooli", "roles": ["admin"]}


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory, chroma_server: Any) -> Iterator[ChromaServer]:
    with chroma_server(tmp_path_factory.mktemp("chroma")) as server:
        yield server


@pytest.fixture(scope="module")
def ledger_url(module_postgres_url: str) -> str:
    return module_postgres_url


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, chroma: ChromaServer, ledger_url: str
) -> Iterator[str]:
    """`keel serve` with the parity config and keel's langgraph.json (its `http.app` too)."""
    workdir = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGSMITH_")}
    env |= {
        "KEEL_LEDGER_URL": ledger_url,
        "KEEL_CHROMA_URL": chroma.url,
        "KEEL_DB_URL": ledger_url,  # readiness: "the server's database"
        "PYTHONPATH": str(ROOT / "tests"),  # the scripted models: serve.parity_models:...
        "ANONYMIZED_TELEMETRY": "False",
        "HF_HUB_OFFLINE": "1",
        "KEEL_HEALTH_MODEL": "serve.parity_models:adder",
    }
    keel = str(Path(sys.executable).with_name("keel"))
    cmd = [keel, "serve", "--server-config", str(SERVER_CONFIG), "--port", str(port)]
    cmd += ["--config", str(ROOT / "langgraph.json")]
    log_path = workdir / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log_path)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        if os.environ.get("KEEL_SHOW_SERVER_LOG"):
            print(log_path.read_text())
    text = log_path.read_text()
    assert "BlockingError" not in text, f"blocking call on the request path:\n{text}"


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"keel serve exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"keel serve did not answer {url}/ok within 120 s:\n{log_path.read_text()}")


@pytest.fixture
async def carol(server: str) -> AsyncIterator[LangGraphClient]:
    async with get_client(url=server, headers={"Authorization": "Bearer token-carol"}) as c:
        yield c


async def _run(c: LangGraphClient, agent: str, text: str) -> dict[str, Any]:
    assistant = await c.assistants.create(
        graph_id="agent", config={"configurable": {"agent": agent}}
    )
    thread = await c.threads.create()
    final = await c.runs.wait(
        thread["thread_id"],
        assistant["assistant_id"],
        input={"messages": [{"role": "user", "content": text}]},
        context=FORGED,  # ignored: memory namespaces follow the token's user and tenant
    )
    assert isinstance(final, dict), final
    return {**final, "thread_id": thread["thread_id"]}


# -- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token", ["token-carol", "token-dan"], ids=["chroma-server", "server-store"]
)
async def test_a_served_agent_remembers_across_runs(
    server: str, chroma: ChromaServer, token: str
) -> None:
    """Run 1 stores a memory (and a lesson); run 2, on a new thread, recalls it."""
    async with get_client(url=server, headers={"Authorization": f"Bearer {token}"}) as c:
        before = await _run(c, "reader", "Where do I ship?")
        assert before["messages"][-1]["content"] == "I do not know where you ship."
        first = await _run(c, "writer", "Remember: I ship to Lisbon.")
        assert first["messages"][-1]["content"] == "Noted."
        assert first["outcome"]["terminated_reason"] == "completed"
        second = await _run(c, "reader", "Where do I ship?")
    assert second["outcome"]["terminated_reason"] == "completed"
    assert second["messages"][-1]["content"] == "You ship to Lisbon."
    assert "keel-recall" not in json.dumps(before["messages"])
    recalled = [m for m in second["messages"] if m.get("id") == "keel-recall"]
    assert "Ships to Lisbon, Portugal." in recalled[0]["content"]
    # carol's tenant keeps its memories on the Chroma server (dan's are in the server's store)
    store = ChromaStore(url=chroma.url, name="initech", index=default_index())
    found = store.search(("memories", "initech", "carol"), query="where do I ship")
    if token == "token-carol":
        assert [i.value for i in found] == [{"text": "Ships to Lisbon, Portugal."}]
        assert len(store.search(("lessons", "initech", "carol"))) == 3  # reflect, each run
    assert store.list_namespaces(prefix=("memories",)) == [("memories", "initech", "carol")]


# -- verify and fallbacks ----------------------------------------------------------------------


async def test_a_served_agent_is_verified_by_its_judge(carol: LangGraphClient) -> None:
    final = await _run(carol, "checked", "What is 17 + 25?")
    assert final["outcome"]["terminated_reason"] == "completed"
    assert final["messages"][-1]["content"] == "17 + 25 = 42."
    assert [v["passed"] for v in final["verdicts"]] == [False, True]
    assert final["verdicts"][0]["reason"] == "17 + 25 is not 41"


async def test_a_served_agent_falls_back_when_its_model_is_down(
    carol: LangGraphClient, ledger_url: str
) -> None:
    final = await _run(carol, "resilient", "Hello?")
    assert final["outcome"]["terminated_reason"] == "completed"
    assert final["messages"][-1]["content"] == "Answered by the backup model."
    # the ledger features: the run is recorded in the ledger for `keel report`
    with psycopg.connect(ledger_url) as conn:
        rows = conn.execute(
            "SELECT tenant_id, user_id, graph, terminated_reason FROM keel_runs "
            "WHERE thread_id = %s",
            (final["thread_id"],),
        ).fetchall()
    assert rows == [("initech", "carol", "resilient", "completed")]


# -- health over HTTP --------------------------------------------------------------------------


def test_liveness_and_the_semantic_check_answer_without_a_token(server: str) -> None:
    live = httpx.get(f"{server}/keel/health/live", timeout=10)
    assert live.status_code == 200
    assert live.json()["checks"][0]["name"] == "live"
    semantic = httpx.get(f"{server}/keel/health/semantic", timeout=60)
    assert semantic.status_code == 200, semantic.text
    assert semantic.json()["checks"][0]["detail"] == "17 + 25 answered 42 through the add tool"


def test_readiness_names_the_chroma_server_when_it_is_down(
    server: str, chroma: ChromaServer
) -> None:
    ready = httpx.get(f"{server}/keel/health/ready", timeout=30)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert [c["name"] for c in body["checks"]] == ["database", "ledger", "chroma"]
    assert body["ok"] is True and body["failing"] == []
    chroma.stop()
    try:
        down = httpx.get(f"{server}/keel/health/ready", timeout=60)
        assert down.status_code == 503, down.text
        assert down.json()["failing"] == ["chroma"]
        assert chroma.url in down.json()["checks"][2]["detail"]
    finally:
        chroma.start()
    assert httpx.get(f"{server}/keel/health/ready", timeout=30).status_code == 200
