"""What a served `langgraph dev` answers on the routes LangGraph leaves open without a token
(`keel.app.http.GatedRoutes`), checked at a base path: `""` (the server's root) or the
`http.mount_prefix` it serves its API under. Users and tokens: `tests/serve/keel-server.toml`.
"""

from __future__ import annotations

import httpx
from langgraph_sdk.client import LangGraphClient

SCRAPER = {"Authorization": "Bearer token-metrics"}
"""The `[metrics]` token's bearer: the Prometheus scraper's."""
ALICE = {"Authorization": "Bearer token-alice"}
NOT_THE_SCRAPER: dict[str, dict[str, str]] = {
    "no token": {},
    "a wrong token": {"Authorization": "Bearer token-mallory"},
    "a user's token": ALICE,
    "not bearer": {"Authorization": "Basic token-metrics"},
}
SPEC = ("/docs", "/openapi.json")
"""The API reference: every route, keel's own too."""


async def metrics_answer_only_the_scrapers_token(http: httpx.AsyncClient, base: str) -> None:
    """`base/metrics` (every tenant's run counts) answers the `[metrics]` token alone: 401 for
    no token, a wrong one, a user's, one not sent as a bearer token; 200 for the scraper's."""
    for what, headers in NOT_THE_SCRAPER.items():
        for path in ("/metrics", "/metrics?format=json", "/metrics/"):
            answer = await http.get(base + path, headers=headers, follow_redirects=True)
            assert answer.status_code == 401, (what, base + path, answer.text)
            assert "[metrics] token" in answer.text
    prometheus = await http.get(f"{base}/metrics", headers=SCRAPER)
    assert prometheus.status_code == 200, prometheus.text
    assert prometheus.headers["content-type"].startswith("text/plain")
    counts = await http.get(f"{base}/metrics", params={"format": "json"}, headers=SCRAPER)
    assert counts.status_code == 200, counts.text
    assert "queue" in counts.json()  # what the token protects: the server's runs, all tenants'


async def the_api_reference_answers_a_known_token(http: httpx.AsyncClient, base: str) -> None:
    """`base/docs` and `base/openapi.json`: 401 without a known token, 200 with a user's or the
    scraper's."""
    for path in SPEC:
        for headers in ({}, {"Authorization": "Bearer token-mallory"}):
            refused = await http.get(base + path, headers=headers)
            assert refused.status_code == 401, (base + path, headers, refused.text)
        for headers in (ALICE, SCRAPER):
            answer = await http.get(base + path, headers=headers)
            assert answer.status_code == 200, (base + path, headers, answer.text)
    spec = await http.get(f"{base}/openapi.json", headers=ALICE)
    assert "/threads" in spec.json()["paths"]


async def these_stay_open(http: httpx.AsyncClient, base: str, paths: tuple[str, ...]) -> None:
    """Each of `paths` under `base` answers 200 with no token (probes, the SDK, Studio)."""
    for path in paths:
        answer = await http.get(base + path)
        assert answer.status_code == 200, (base + path, answer.text)


async def internal_routes_are_closed(
    http: httpx.AsyncClient, alice: LangGraphClient, base: str
) -> None:
    """`langgraph dev`'s `base/internal/...` and `base/deploy`: 404, token or none; alice's
    thread (which `/internal/truncate` would delete) is still there."""
    thread = await alice.threads.create()
    thread_id = thread["thread_id"]
    for headers in ({}, ALICE, SCRAPER):
        read = await http.get(f"{base}/internal/debug/thread/{thread_id}", headers=headers)
        assert read.status_code == 404, (base, read.text)
        assert "keel_owner" not in read.text
        assert (await http.get(f"{base}/deploy", headers=headers)).status_code == 404
        assert (await http.post(f"{base}/deploy", headers=headers)).status_code == 404
        truncated = await http.post(f"{base}/internal/truncate", headers=headers)
        assert truncated.status_code == 404, (base, truncated.text)
    assert (await alice.threads.get(thread_id))["thread_id"] == thread_id  # still there
