"""A served agent's memory, verify and fallback settings: parsing, careless configs, the store.

The served behaviour (a real `langgraph dev` and a real `chroma run`) is in
test_server_parity.py; these check what a careless config gets told, without a server.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from conftest import free_port

from keel import SetupError, UserError
from keel.app.agent_options import MemorySpec
from keel.app.server import build_tenant_agent
from keel.app.server_config import ServerConfig
from keel.app.server_memory import ChromaServerStore

HEAD = """
[[users]]
token = "t"
user = "alice"
tenant = "acme"
"""


def _config(tmp_path: Path, tenant: str = "", agent: str = "") -> ServerConfig:
    text = f"{HEAD}\n[tenants.acme]\n{tenant}\n[tenants.acme.agents.main]\nmodel = 'keel:demo'\n"
    path = tmp_path / "server.toml"
    path.write_text(text + agent, encoding="utf-8")
    return ServerConfig.from_file(path)


def test_a_full_agent_table_is_read(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        tenant='memory = { chroma_url = "http://127.0.0.1:8011", collection = "acme" }',
        agent="memory = true\nfallback_models = ['keel:demo-support']\nmodel_timeout = 2.5\n"
        "verify = { judge = 'keel:demo', max_revisions = 2, escalate = true }\n",
    )
    tenant = config.tenant("acme")
    assert tenant.memory == MemorySpec(chroma_url="http://127.0.0.1:8011", collection="acme")
    options = tenant.agents["main"].options
    assert (options.memory, options.fallback_models, options.model_timeout) == (
        True,
        ("keel:demo-support",),
        2.5,
    )
    assert options.verify is not None
    assert (options.verify.judge, options.verify.max_revisions, options.verify.escalate) == (
        "keel:demo",
        2,
        True,
    )
    # building it opens nothing: the Chroma server is reached on the first store operation
    agent = build_tenant_agent(tenant)
    assert {"recall", "reflect", "verify"} <= set(agent.get_graph().nodes)


def test_an_agent_without_the_new_keys_is_as_before(tmp_path: Path) -> None:
    tenant = _config(tmp_path).tenant("acme")
    assert tenant.memory is None
    options = tenant.agents["main"].options
    assert (options.memory, options.fallback_models, options.verify) == (False, (), None)
    assert "recall" not in build_tenant_agent(tenant).get_graph().nodes


@pytest.mark.parametrize(
    ("tenant", "agent", "message"),
    [
        ("", "memory = 'yes'", "memory must be true or false, got 'yes'"),
        ("", "fallback_models = 'keel:demo'", "fallback_models must be a list of model strings"),
        (
            "",
            "fallback_models = ['gpt4']",
            "fallback_models entry 'gpt4' must read 'provider:name'",
        ),
        ("", "fallback_models = ['keel:nope']", "'keel:nope' is not a bundled model"),
        ("", "model_timeout = 0", "model_timeout must be seconds > 0, got 0"),
        ("", "verify = 'keel:demo'", "verify must be a table"),
        ("", "verify = { max_revisions = 1 }", "verify needs judge = "),
        ("", "verify = { judge = 'keel:demo', rounds = 2 }", "unknown key(s) ['rounds']"),
        ("", "verify = { judge = 'keel:demo', max_revisions = -1 }", "must be 0 or more"),
        ("memory = 'chroma'", "", "memory must be a table"),
        (
            "memory = { chroma_url = 'localhost:8000' }",
            "",
            "must look like 'http://127.0.0.1:8000'",
        ),
        ("memory = { url = 'http://h:1' }", "", "unknown key(s) ['url'] in [tenants.acme.memory]"),
        ("memory = { chroma_url = '${NO_SUCH_VAR}' }", "", "NO_SUCH_VAR, which is not set"),
        ("memory = { index = 'minilm' }", "", "index must read 'package.module:attribute'"),
    ],
)
def test_careless_settings_are_named(tmp_path: Path, tenant: str, agent: str, message: str) -> None:
    with pytest.raises(SetupError) as caught:
        _config(tmp_path, tenant=tenant, agent=agent)
    assert message in str(caught.value)


def test_a_chroma_server_that_is_down_fails_each_operation_and_is_tried_again() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens here
    store = ChromaServerStore(MemorySpec(chroma_url=url, index="keel.memory:default_index"))
    for _ in range(2):
        with pytest.raises(SetupError, match=re.escape(f"Cannot reach a Chroma server at {url}")):
            asyncio.run(store.asearch(("memories", "acme", "alice")))
    with pytest.raises(SetupError, match="Cannot reach a Chroma server"):
        store.put(("memories", "acme", "alice"), "k", {"text": "x"})


def test_a_bad_index_path_is_named() -> None:
    store = ChromaServerStore(MemorySpec(chroma_url="http://127.0.0.1:1", index="no.such:thing"))
    with pytest.raises(
        UserError, match=re.escape("memory index 'no.such:thing' cannot be imported")
    ):
        store.opened()
    with pytest.raises(UserError, match="ChromaServerStore needs a MemorySpec with chroma_url"):
        ChromaServerStore(MemorySpec())
