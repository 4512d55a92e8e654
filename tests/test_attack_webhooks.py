"""keel's auth refuses a run whose `webhook` names an internal address (in process).

LangGraph's server POSTs a run's output to its `webhook` from inside the deployment. keel's
langgraph.json has LangGraph refuse non-https URLs and private addresses before keel's auth
sees the run (`test_attack_served_client.py`); a deployment whose langgraph.json lacks that
`webhooks.url` table gets LangGraph's defaults, which let `http://10.0.0.1/` through. keel's
auth refuses it there: addresses as sent (names are LangGraph's to resolve, at each call),
unless the server config says `[webhooks] private = true`. Also the `[metrics]` token's and
`[webhooks]`' parsing, and `keel serve`'s langgraph.json matching the repository's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langgraph_sdk import Auth

from keel import SetupError
from keel.app.serve import LANGGRAPH_JSON
from keel.app.server_config import CONFIG_ENV, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[[users]]
token = "a"
user = "ann"
tenant = "acme"

[tenants.acme.agents.support]
model = "keel:demo"
"""
HI = {"messages": [{"role": "user", "content": "hi"}]}


async def create_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, webhook: Any, extra: str = ""
) -> Any:
    """keel's auth deciding on alice's run with this `webhook` (as LangGraph hands it over)."""
    path = tmp_path / "server.toml"
    path.write_text(CONFIG + extra, encoding="utf-8")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    from keel.app import auth

    user = await auth.authenticate("Bearer a")
    ctx = Auth.types.AuthContext(user=user, permissions=[], resource="threads", action="create_run")
    run = {"thread_id": None, "metadata": {}, "kwargs": {"input": HI, "webhook": webhook}}
    return await auth.owned(ctx, run)


REFUSED = {
    "http://10.0.0.1/x": "is a private address",
    "https://192.168.1.10/hook": "is a private address",
    "https://[::ffff:10.0.0.1]/": "is a private address",
    "http://169.254.169.254/latest/meta-data/": "link-local, metadata",
    "http://[fd00:ec2::254]/": "link-local, metadata",
    "http://127.0.0.1:1/": "loopback",
    "http://2130706433/": "loopback",  # 127.0.0.1 spelled as a number
    "http://0x7f.1/": "loopback",
    "http://[::1]/": "loopback",
    "file:///etc/passwd": "not an http(s) URL",
    "gopher://example.com/": "not an http(s) URL",
    "http://LOCALHOST./": "names this machine",
    "http://metadata.google.internal/": "names this machine",
    "http://db.internal/": "a private network's name",
}


@pytest.mark.parametrize("url", list(REFUSED))
async def test_a_webhook_to_an_internal_address_is_refused_by_keels_auth(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(Auth.exceptions.HTTPException) as caught:
        await create_run(tmp_path, monkeypatch, url)
    assert caught.value.status_code == 422
    assert REFUSED[url] in str(caught.value.detail)
    assert "Send a public http(s) URL" in str(caught.value.detail)


@pytest.mark.parametrize("url", ["https://hooks.example.com/keel", "https://1.1.1.1/x", None, ""])
async def test_a_public_webhook_or_none_is_taken(
    url: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await create_run(tmp_path, monkeypatch, url) == {
        "keel_tenant": "acme",
        "keel_owner": "ann",
    }


async def test_a_deployment_may_let_webhooks_reach_its_private_network_and_no_further(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[webhooks] private = true` lets a run name the private network; this machine and the
    cloud's metadata service stay refused."""
    opt_in = "\n[webhooks]\nprivate = true\n"
    for url in ("http://10.0.0.1/x", "http://db.internal/hook", "http://[fd12::1]/"):
        assert await create_run(tmp_path, monkeypatch, url, opt_in), url
    for url in ("http://169.254.169.254/", "http://127.0.0.1/", "http://localhost/"):
        with pytest.raises(Auth.exceptions.HTTPException):
            await create_run(tmp_path, monkeypatch, url, opt_in)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ('\n[metrics]\ntoken = "a"\n', "the same token as a user"),
        ("\n[metrics]\n", "exactly one of token_sha256"),
        ('\n[metrics]\ntoken_sha256 = "abc"\n', "64 hex digits"),
        ('\n[metrics]\ntoken = "m"\nuser = "x"\n', "unknown key(s) ['user'] in [metrics]"),
        ('\n[webhooks]\nprivate = "yes"\n', "private must be true or false"),
        ("\n[webhooks]\nhttp = true\n", "unknown key(s) ['http'] in [webhooks]"),
    ],
)
def test_a_bad_metrics_or_webhooks_table_is_refused(tmp_path: Path, extra: str, error: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(CONFIG + extra, encoding="utf-8")
    with pytest.raises(SetupError) as caught:
        ServerConfig.from_file(path)
    assert error in str(caught.value)


def test_the_metrics_token_is_its_own(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(CONFIG + '\n[metrics]\ntoken = "m"\n', encoding="utf-8")
    config = ServerConfig.from_file(path)
    assert config.is_metrics_token("m") and not config.is_metrics_token("a")
    assert config.authenticate("m") is None  # a scraper's token is no user's


def test_keel_serve_sets_the_webhook_policy_the_repositorys_langgraph_json_sets() -> None:
    """`keel serve` without a langgraph.json writes LANGGRAPH_JSON: the same webhook policy as
    the one `test_attack_served_client.py` serves (https only, no private address)."""
    repository = json.loads((ROOT / "langgraph.json").read_text(encoding="utf-8"))
    policy = {"url": {"require_https": True, "disable_private_ips": True}}
    assert LANGGRAPH_JSON["webhooks"] == repository["webhooks"] == policy
