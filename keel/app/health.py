"""Health checks: liveness, readiness (database, Chroma, model) and a semantic check.

- `liveness()`: the process can run Python and import keel (no I/O).
- `readiness(db=..., chroma=..., model=...)`: the checkpoint schema and keel's ledger are
  reachable and current, Chroma answers a heartbeat, a model is configured.
- `served_readiness(db=..., ledger=..., chroma=...)`: what a served deployment depends on: the
  server's database answers, keel's ledger is reachable and migrated, each Chroma server
  answers (the routes in `keel.app.http` serve it).
- `semantic_check(model)`: a known task (`17 + 25` with a calculator tool) runs through
  `build_agent`; it passes when the run completes, the tool was called and the answer says 42.

`check_health(...)` runs them and returns a `Health`; `keel health` prints it (exit 1 on a
failure). Each check catches its own error: a broken dependency is a failed check with the
reason, never an exception.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, ToolMessage

from keel._version import __version__
from keel.errors import UserError

__all__ = [
    "Check",
    "Health",
    "acheck_health",
    "check_health",
    "liveness",
    "readiness",
    "semantic_check",
    "served_readiness",
]

SEMANTIC_TASK = "What is 17 + 25? Use the add tool, then answer with the number."
"""The known task of the semantic check."""


@dataclass(frozen=True, slots=True)
class Check:
    """One health check's result."""

    name: str
    """`live`, `database`, `chroma`, `model` or `semantic`."""
    ok: bool
    """Whether it passed."""
    detail: str
    """What was checked, or why it failed and how to fix it."""
    seconds: float = 0.0
    """How long it took."""


@dataclass(frozen=True, slots=True)
class Health:
    """The results of a set of checks."""

    checks: tuple[Check, ...]
    """Each check, in the order run."""

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """`{"ok": ..., "checks": [...]}`, JSON-able."""
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def _timed(name: str, probe: Callable[[], str], url: str | None = None) -> Check:
    start = time.perf_counter()
    try:
        detail, ok = probe(), True
    except Exception as exc:
        detail, ok = f"{type(exc).__name__}: {exc}", False
    # an error may echo the URL it was given (psycopg quotes a malformed URI whole) or a part
    # of it (libpq splits `user:pa@ss@host` at the first `@` and names the host `ss@host`)
    detail = _safe(detail)
    for secret in _passwords(url):
        detail = detail.replace(secret, "***")
    return Check(name, ok, detail, time.perf_counter() - start)


def _passwords(url: str | None) -> list[str]:
    """The password in `url` and, when it holds an `@`, each part of it (longest first)."""
    if not url:
        return []
    found = [m.group(1) for m in re.finditer(r"://[^:/@\s]+:(\S*)@", url)]
    found += [m.group(2).strip("'") for m in _KEY_PASSWORD.finditer(url)]
    parts = {p for secret in found for p in (secret, *secret.split("@")) if len(p) >= 3}
    return sorted(parts, key=len, reverse=True)


def liveness() -> Health:
    """The process is alive (no I/O)."""
    return Health((Check("live", True, f"keel {__version__}"),))


def readiness(
    *,
    db: str | None = None,
    chroma: str | Path | None = None,
    model: str | BaseChatModel | None = None,
) -> Health:
    """Database (checkpoints and ledger), Chroma (when given) and the model (or `KEEL_MODEL`)."""
    checks = [_timed("database", lambda: _database(db), db)]
    if chroma is not None:
        checks.append(_timed("chroma", lambda: _chroma(chroma)))
    checks.append(_timed("model", lambda: _model(model)))
    return Health(tuple(checks))


def served_readiness(
    *,
    db: str | None = None,
    ledger: str | None = None,
    chroma: Sequence[str] = (),
) -> Health:
    """A served deployment's parts: its database, keel's ledger, its Chroma servers.

    Each part is checked only when given; a failing one is a failed check naming it.
    """
    checks = []
    if db is not None:
        checks.append(_timed("database", lambda: _select_one(db), db))
    if ledger is not None:
        checks.append(_timed("ledger", lambda: _ledger(ledger), ledger))
    checks += [_timed("chroma", partial(_chroma, url)) for url in dict.fromkeys(chroma)]
    return Health(tuple(checks))


def _select_one(url: str) -> str:
    import psycopg

    # SQLAlchemy-style URLs (Aegra's postgresql+asyncpg://) name a driver psycopg does not take
    plain = re.sub(r"^postgres(ql)?\+\w+://", "postgresql://", url)
    if not plain.startswith(("postgresql://", "postgres://")):
        raise UserError(f"the server database must be PostgreSQL, got {_safe(url)}")
    with psycopg.connect(plain, connect_timeout=5) as conn:
        conn.execute("SELECT 1")
    return f"{_safe(url)} answers"


def _ledger(url: str | None) -> str:
    """The ledger at `url` is reachable and migrated (its tables set up)."""
    from keel.db.ledger import Ledger
    from keel.db.persistence import Persistence

    # one connection first: a server that refuses, a wrong password or no such database fails
    # the check at once, with psycopg's reason, instead of after the ledger pool's 10 s of retries
    Persistence(url).reach()
    ledger = Ledger(url)
    try:
        ledger.setup()
        ledger.run(_ping())
    finally:
        ledger.close()
    return f"keel's ledger ready at {_safe(url) if url else 'the default database'}"


_URL_PASSWORD = re.compile(r"://([^:/@\s\"']+):[^\s\"']*@")
"""A URL's `user:password@` (up to the last `@`: a password may hold one, unencoded)."""
_KEY_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|[^\s&\"']+)", re.IGNORECASE)
"""`password=...` in a query string or a libpq key=value string."""


def _safe(text: str) -> str:
    """`text` (a URL, or a message quoting one) without any password."""
    return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"://\1:***@", text))


def _database(db: str | None) -> str:
    from keel.db.persistence import Persistence

    persistence = Persistence(db)
    persistence.check()
    _ledger(db)
    return f"checkpoints and ledger ready at {persistence.safe_url}"


def _ping() -> Any:
    rows = yield "SELECT 1", ()
    return rows


def _chroma(where: str | Path) -> str:
    """Open a Chroma client, ask it, close it (a probe every few seconds must hold nothing)."""
    from keel.memory._open import client_of, close_client

    text = str(where)
    if text.startswith(("http://", "https://")):
        client, _ = client_of(path=None, url=text, client=None)
    else:
        if not Path(text).expanduser().is_dir():  # `~/mem` is the home folder's, as in ChromaStore
            raise UserError(f"no Chroma directory at {text!r}")
        client, _ = client_of(path=text, url=None, client=None)  # a folder it cannot open
    try:
        client.heartbeat()  # fails each check, not every check after the first in the process
        return f"Chroma at {text} answers ({len(client.list_collections())} collections)"
    finally:
        close_client(client)  # a store open on the path keeps its own reference


def _model(model: str | BaseChatModel | None) -> str:
    from keel.models import model_name_of, resolve_model

    given = model if model is not None else os.environ.get("KEEL_MODEL")
    if not given:
        raise UserError("no model configured: set KEEL_MODEL (e.g. openai:gpt-4o-mini)")
    return f"model {model_name_of(resolve_model(given))} configured"


def semantic_check(model: str | BaseChatModel | None = None) -> Check:
    """Run the known task through `build_agent` and check the answer (`42`, via the tool)."""
    return _timed("semantic", lambda: _semantic(model))


def _semantic(model: str | BaseChatModel | None) -> str:
    from keel.graphs import build_agent
    from keel.state import AgentState, RunContext
    from keel.tools import tool

    given = model if model is not None else os.environ.get("KEEL_MODEL")
    if not given:
        raise UserError("no model configured for the semantic check: set KEEL_MODEL")

    @tool(name="add")
    def add(a: float, b: float) -> str:
        """Add two numbers."""
        return f"{a + b:g}"

    agent = build_agent(given, [add], name="keel_health")
    result = agent.invoke(
        AgentState(messages=[HumanMessage(content=SEMANTIC_TASK)]),
        context=RunContext(user_id="keel-health", tenant_id="keel-health"),
    )
    outcome = result.get("outcome") or {}
    if outcome.get("terminated_reason") != "completed":
        raise AssertionError(f"the run ended {outcome.get('terminated_reason')}: {outcome}")
    messages = result["messages"]
    if not any(isinstance(m, ToolMessage) and m.name == "add" for m in messages):
        raise AssertionError("the agent answered without calling the add tool")
    answer = messages[-1].text
    if "42" not in answer:
        raise AssertionError(f"expected 42 in the answer, got {answer!r}")
    return "17 + 25 answered 42 through the add tool"


def check_health(
    *,
    db: str | None = None,
    chroma: str | Path | None = None,
    model: str | BaseChatModel | None = None,
    semantic: bool = False,
) -> Health:
    """Liveness, readiness and (with `semantic=True`) the semantic check."""
    checks = [*liveness().checks, *readiness(db=db, chroma=chroma, model=model).checks]
    if semantic:
        checks.append(semantic_check(model))
    return Health(tuple(checks))


async def acheck_health(
    *,
    db: str | None = None,
    chroma: str | Path | None = None,
    model: str | BaseChatModel | None = None,
    semantic: bool = False,
) -> Health:
    """`check_health` off the event loop (a worker thread), for async servers."""
    return await asyncio.to_thread(
        check_health, db=db, chroma=chroma, model=model, semantic=semantic
    )
