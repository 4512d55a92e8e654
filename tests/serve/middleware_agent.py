"""A LangChain `create_agent` with keel's `PermissionMiddleware`, served by the e2e test.

Only `admin` may delete accounts; the scripted model tries to, for whoever asks.
"""

from __future__ import annotations

from langchain.agents import create_agent
from langchain_core.tools import tool

from keel.evals import ScriptedChatModel, call
from keel.guards import PermissionMiddleware, Policy, Rule

DELETED: list[str] = []

POLICY = Policy(
    name="accounts",
    rules=(Rule(role="admin", tool="delete_account", action="allow"),),
)


@tool
def delete_account(user: str) -> str:
    """Delete a user's account."""
    DELETED.append(user)
    return f"deleted {user}"


graph = create_agent(
    ScriptedChatModel(script=[call("delete_account", user="bob"), "done"]),
    tools=[delete_account],
    middleware=[PermissionMiddleware(POLICY)],
)
