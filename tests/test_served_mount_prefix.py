"""`keel serve` with LangGraph's `http.mount_prefix`: every route keel gates stays gated.

Found by audit: with `"http": {"mount_prefix": "/agents/v1"}` in langgraph.json, LangGraph
server serves its API (and keel's http app) under the prefix, inside an app of its own whose
root `/`, `/ok` and `/metrics` pass none of the custom app's middleware: the root `/metrics`
answered anyone, with every tenant's run counts. keel's app gates that wrapper's routes as the
server starts (`keel.app.http.gate_outer_routes`). Checked here against a real `langgraph dev`
on the prefix and at the root; `tests/test_attack_served_client.py` checks the same routes on a
server with no prefix.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import gated_routes
import httpx
import pytest
import servers
from langgraph_sdk.client import LangGraphClient

PREFIX = "/agents/v1"


@pytest.fixture(scope="module")
def server(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """keel's langgraph.json with `http.mount_prefix`, served by `keel serve`: its root URL."""
    workdir = tmp_path_factory.mktemp("mount-prefix")
    spec = json.loads((servers.ROOT / "langgraph.json").read_text(encoding="utf-8"))
    spec["dependencies"] = [str(servers.ROOT)]
    spec["http"] = {**spec["http"], "mount_prefix": PREFIX}
    config = workdir / "langgraph.json"
    config.write_text(json.dumps(spec), encoding="utf-8")
    with servers.fresh_database(postgres_url, "keel_mount_prefix") as ledger_url:
        try:
            with servers.serving_dev(workdir, ledger_url, config=config) as (url, _):
                yield url
        except servers.ServerFailed as exc:
            pytest.fail(str(exc))


@pytest.fixture
async def http(server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with servers.client(server) as client:
        yield client


@pytest.fixture
async def alice(server: str) -> AsyncIterator[LangGraphClient]:
    async with servers.sdk_client(server + PREFIX, gated_routes.ALICE, 60) as client:
        yield client


@pytest.mark.parametrize("base", ["", PREFIX], ids=["root", "prefix"])
async def test_metrics_answer_only_the_scrapers_token(http: httpx.AsyncClient, base: str) -> None:
    """The root `/metrics` (LangGraph's wrapper serves it there too) and the prefix's: the
    `[metrics]` token's alone."""
    await gated_routes.metrics_answer_only_the_scrapers_token(http, base)


async def test_the_api_reference_answers_a_known_token_and_the_rest_stays_open(
    http: httpx.AsyncClient,
) -> None:
    """Under the prefix as without one; at the root the reference is not served at all."""
    await gated_routes.the_api_reference_answers_a_known_token(http, PREFIX)
    for path in gated_routes.SPEC:
        for headers in ({}, gated_routes.ALICE, gated_routes.SCRAPER):
            assert (await http.get(path, headers=headers)).status_code == 404, path
    await gated_routes.these_stay_open(http, PREFIX, ("/ok", "/", "/info", "/keel/health/live"))
    await gated_routes.these_stay_open(http, "", ("/ok", "/"))  # the wrapper's probes


@pytest.mark.parametrize("base", ["", PREFIX], ids=["root", "prefix"])
async def test_langgraph_devs_internal_routes_are_closed(
    http: httpx.AsyncClient, alice: LangGraphClient, base: str
) -> None:
    """`/internal/...` and `/deploy`: 404 under the prefix, and not served at the root."""
    await gated_routes.internal_routes_are_closed(http, alice, base)
