"""The permission matrix: ordered `(role, tool glob, resource glob) → allow | deny | ask` rules.

First as a pure decision over fabricated tools and `RunContext`s (exact reasons asserted), then
end to end through `build_agent(policy=...)` on SQLite and PostgreSQL, then a property test:
whatever the rules and whoever calls, a call the matrix denies never executes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command

from keel import Persistence, RunContext, build_agent, tool
from keel.approvals import Grants, approval_digest
from keel.evals import ScriptedChatModel, call
from keel.guards import GateDecision, PermissionMatrix, Policy, Rule
from keel.guards.standing import Always, standing_approval
from keel.nodes import valid_history
from keel.tools import RegisteredTool, ToolRegistry

SUPPORT = RunContext(user_id="u1", tenant_id="acme", roles=("support",))


def entry(
    name: str = "lookup_order", *, risk: str = "read", resource: Any = None
) -> RegisteredTool:
    """A fabricated registered tool: only its name and spec matter to the matrix."""

    def act(order_id: str = "A1") -> str:
        """Act on an order."""
        raise AssertionError("the matrix never runs a tool")

    built = tool(name=name, risk=risk, resource=resource)(act)  # type: ignore[arg-type]
    found = ToolRegistry([built]).get(name)
    assert found is not None
    return found


def orders(args: Any) -> str:
    return f"orders/{args['order_id']}"


def decide(
    rules: Sequence[Rule], tool_: RegisteredTool, args: dict[str, Any], *roles: str
) -> GateDecision:
    context = RunContext(roles=roles) if roles else SUPPORT
    return PermissionMatrix.of(*rules)(tool_, args, context)


# ===========================================================================================
# Pure decisions
# ===========================================================================================


def test_first_match_wins() -> None:
    refund = entry("issue_refund", resource=orders)
    vip_first = (
        Rule(tool="issue_refund", resource="orders/VIP*", action="deny", reason="VIP: manager"),
        Rule(tool="issue_refund", resource="orders/*", action="allow"),
    )
    assert decide(vip_first, refund, {"order_id": "VIP7"}) == GateDecision.deny(
        "VIP: manager", rule="* | issue_refund | orders/VIP* → deny"
    )
    assert decide(vip_first, refund, {"order_id": "A1"}) == GateDecision.allow(
        "* | issue_refund | orders/* → allow"
    )
    # the same rules the other way round: the broad allow shadows the deny
    assert decide(vip_first[::-1], refund, {"order_id": "VIP7"}).action == "allow"


def test_star_role_matches_any_role_and_a_named_role_only_that_role() -> None:
    rules = (
        Rule(role="admin", tool="delete_*", action="allow"),
        Rule(role="*", tool="lookup_*", action="allow"),
    )
    lookup, delete = entry("lookup_order"), entry("delete_order", risk="write")
    assert decide(rules, lookup, {}, "support").action == "allow"
    assert decide(rules, lookup, {}, "anyone").action == "allow"
    assert decide(rules, delete, {}, "support").action == "deny"
    assert decide(rules, delete, {}, "support", "admin").action == "allow"


def test_rule_roles_are_names_not_globs() -> None:
    rules = (Rule(role="sup*", action="allow"),)
    assert decide(rules, entry(), {}, "support").action == "deny"
    assert decide(rules, entry(), {}, "sup*").action == "allow"


def test_tool_globs_are_case_sensitive_shell_globs() -> None:
    rules = (Rule(tool="lookup_*", action="allow"),)
    assert decide(rules, entry("lookup_order"), {}).action == "allow"
    assert decide(rules, entry("lookup_"), {}).action == "allow"
    assert decide(rules, entry("order_lookup"), {}).action == "deny"
    assert decide(rules, entry("Lookup_order"), {}).action == "deny"
    assert decide(
        (Rule(tool="lookup_[ou]*", action="allow"),), entry("lookup_user"), {}
    ).action == ("allow")


def test_resource_globs_match_the_tool_resource_extractor() -> None:
    @tool(resource=lambda a: f"orders/{a['order_id']}")
    def cancel_order(order_id: str) -> str:
        """Cancel an order."""
        return order_id

    cancel = ToolRegistry([cancel_order]).get("cancel_order")
    assert cancel is not None
    rules = (Rule(tool="cancel_order", resource="orders/A*", action="allow"),)
    assert decide(rules, cancel, {"order_id": "A1"}) == GateDecision.allow(
        "* | cancel_order | orders/A* → allow"
    )
    assert decide(rules, cancel, {"order_id": "B1"}) == GateDecision.deny(
        "no rule allows cancel_order on orders/B1 for roles support; keel denies by default",
        rule="default deny",
    )


def test_a_tool_without_extractor_touches_star_so_resource_rules_fail_closed() -> None:
    rules = (Rule(tool="lookup_order", resource="orders/*", action="allow"),)
    assert decide(rules, entry("lookup_order"), {"order_id": "A1"}) == GateDecision.deny(
        "no rule allows lookup_order on * for roles support; keel denies by default",
        rule="default deny",
    )


def test_default_deny_for_an_unlisted_tool_with_the_exact_reason() -> None:
    rules = (Rule(role="support", tool="lookup_*", action="allow"),)
    decision = decide(rules, entry("delete_user", risk="write"), {}, "support", "billing")
    assert decision == GateDecision(
        action="deny",
        reason=(
            "no rule allows delete_user on * for roles support, billing; keel denies by default"
        ),
        rule="default deny",
    )
    assert PermissionMatrix.of()(entry(), {}, RunContext(roles=())) == GateDecision.deny(
        "no rule allows lookup_order on * for roles (none); keel denies by default",
        rule="default deny",
    )


def test_deny_carries_the_rule_and_its_reason() -> None:
    rules = (Rule(tool="delete_*", action="deny", reason="deletes are done by ops"),)
    assert decide(rules, entry("delete_order"), {}) == GateDecision.deny(
        "deletes are done by ops", rule="* | delete_* | * → deny"
    )
    without_reason = (Rule(tool="delete_*", action="deny"),)
    refund = entry("delete_order", resource=orders)
    assert decide(without_reason, refund, {"order_id": "A1"}) == GateDecision.deny(
        "delete_order on orders/A1", rule="* | delete_* | * → deny"
    )


def test_ask_carries_the_rule_for_the_reviewer() -> None:
    rules = (Rule(tool="issue_refund", action="ask", reason="refunds need a manager"),)
    assert decide(rules, entry("issue_refund"), {}) == GateDecision.ask(
        "refunds need a manager; a human must approve", rule="* | issue_refund | * → ask"
    )


def test_a_tool_that_requires_approval_is_asked_about_even_when_a_rule_allows_it() -> None:
    rules = (Rule(action="allow"),)
    destructive = entry("issue_refund", risk="destructive")
    assert destructive.spec.requires_approval
    assert decide(rules, destructive, {}) == GateDecision.ask(
        "issue_refund is destructive; a human must approve", rule="* | * | * → allow"
    )
    # ... but a deny still denies it
    assert decide((Rule(action="deny"),), destructive, {}).action == "deny"


def test_a_raising_resource_extractor_denies_even_under_allow_all() -> None:
    def broken(args: Any) -> str:
        return str(1 / 0)

    tool_ = entry("cancel_order", resource=broken)
    assert decide((Rule(action="allow"),), tool_, {"order_id": "A1"}) == GateDecision.deny(
        "cannot tell what cancel_order would touch (ZeroDivisionError: division by zero)",
        rule="resource extractor failed",
    )
    # a missing key is the same: the gate never opens on an unknown resource
    decision = decide((Rule(action="allow"),), entry("x", resource=lambda a: a["account"]), {})
    assert decision == GateDecision.deny(
        "cannot tell what x would touch (KeyError: 'account')", rule="resource extractor failed"
    )


def test_the_resource_extractor_reads_the_arguments_as_the_tool_does() -> None:
    """An argument left out is its default (`order_id="A1"`): the tool acts on order A1."""
    rules = (Rule(resource="orders/A1", action="deny"), Rule(action="allow"))
    assert decide(rules, entry("x", resource=orders), {}).action == "deny"


def test_match_and_from_policy() -> None:
    first = Rule(role="support", tool="lookup_*", action="allow")
    second = Rule(tool="*", action="deny")
    matrix = PermissionMatrix.from_policy(Policy(rules=(first, second)))
    assert matrix.rules == (first, second)
    assert matrix.match(["support"], "lookup_order", "*") is first
    assert matrix.match(["viewer"], "lookup_order", "*") is second
    assert PermissionMatrix.of(first).match(["viewer"], "lookup_order", "*") is None


# ===========================================================================================
# End to end: build_agent(policy=...) on SQLite and PostgreSQL
# ===========================================================================================


class Shop:
    """Tools that record every execution, so a test can prove a call never ran."""

    def __init__(self) -> None:
        self.refunds: list[tuple[str, float]] = []
        self.deleted: list[str] = []
        self.credits: list[tuple[str, float]] = []

    def tools(self) -> list[Any]:
        @tool(resource=orders)
        def lookup_order(order_id: str) -> str:
            """Look an order up."""
            return f"{order_id}: delivered, $42.50"

        @tool(risk="destructive", resource=orders)
        def issue_refund(order_id: str, amount: float) -> str:
            """Refund an order."""
            self.refunds.append((order_id, amount))
            return f"refunded ${amount} on {order_id}"

        @tool(risk="write", resource=orders)
        def delete_order(order_id: str) -> str:
            """Delete an order."""
            self.deleted.append(order_id)
            return f"deleted {order_id}"

        @tool(risk="write")
        def grant_credit(account: str, amount: float, role: str = "customer") -> str:
            """Grant store credit (`role` is what the caller claims to be)."""
            self.credits.append((account, amount))
            return f"granted {amount} to {account}"

        return [lookup_order, issue_refund, delete_order, grant_credit]


RULES = (
    Rule(role="support", tool="lookup_*", action="allow"),
    Rule(tool="delete_order", action="deny", reason="deletes are done by ops"),
    Rule(
        role="support",
        tool="issue_refund",
        resource="orders/VIP*",
        action="deny",
        reason="VIP refunds go to the account manager",
    ),
    Rule(
        role="support",
        tool="issue_refund",
        resource="orders/*",
        action="ask",
        reason="refunds need a manager",
    ),
    Rule(role="admin", tool="grant_credit", action="allow"),
)
POLICY = Policy(name="support", version="1", rules=RULES)
REFUND_ASK = (
    "refunds need a manager; a human must approve (rule: support | issue_refund | orders/* → ask)"
)


@contextmanager
def saver_for(db_url: str) -> Iterator[BaseCheckpointSaver[Any]]:
    with Persistence(db_url).checkpointer() as saver:
        yield saver


def thread(name: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": name}}


def user(text: str) -> dict[str, Any]:
    return {"messages": [("user", text)]}


def statuses(final: dict[str, Any]) -> list[str]:
    return [
        m.response_metadata["keel_status"] for m in final["messages"] if isinstance(m, ToolMessage)
    ]


def requests(result: dict[str, Any]) -> list[dict[str, Any]]:
    (interrupt,) = result["__interrupt__"]
    return list(interrupt.value)


def assert_valid(final: dict[str, Any]) -> None:
    assert valid_history(final["messages"]) == final["messages"]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_deny_never_runs_the_tool_and_tells_the_model_which_rule(
    db_url: str, mode: str
) -> None:
    shop = Shop()
    model = ScriptedChatModel(script=[call("delete_order", order_id="A1"), "I cannot delete it."])
    payload, config = user("delete order A1"), thread("deny")
    if mode == "invoke":
        with Persistence(db_url).checkpointer() as saver:
            agent = build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver)
            final = agent.invoke(payload, config, context=SUPPORT)
    else:
        async with Persistence(db_url).acheckpointer() as asaver:
            agent = build_agent(model, shop.tools(), policy=POLICY, checkpointer=asaver)
            final = await agent.ainvoke(payload, config, context=SUPPORT)

    assert shop.deleted == []
    (denied,) = [m for m in final["messages"] if isinstance(m, ToolMessage)]
    assert denied.response_metadata == {"keel_status": "denied"}
    assert denied.status == "error"
    assert denied.content == (
        "Not permitted: deletes are done by ops (rule: * | delete_order | * → deny)."
    )
    # the model saw the denial and the run went on to its final answer
    assert model.calls[-1][-1] == denied
    assert final["outcome"]["terminated_reason"] == "completed"
    assert final["messages"][-1].text == "I cannot delete it."
    assert final["usage"].get("tool_calls", 0) == 0
    assert "__interrupt__" not in final


def test_default_deny_for_an_unlisted_tool_end_to_end(db_url: str) -> None:
    shop = Shop()
    only_lookups = Policy(rules=(Rule(tool="lookup_*", action="allow"),))
    model = ScriptedChatModel(
        script=[
            call("grant_credit", account="acct-9", amount=5),
            call("lookup_order", order_id="A1"),
            "ok",
        ]
    )
    with saver_for(db_url) as saver:
        agent = build_agent(model, shop.tools(), policy=only_lookups, checkpointer=saver)
        final = agent.invoke(user("credit"), thread("unlisted"), context=SUPPORT)
    assert shop.credits == []
    assert statuses(final) == ["denied", "success"]
    first = next(m for m in final["messages"] if isinstance(m, ToolMessage))
    assert first.content == (
        "Not permitted: no rule allows grant_credit on * for roles support; keel denies by "
        "default (rule: default deny)."
    )
    assert final["outcome"]["terminated_reason"] == "completed"


def test_ask_interrupts_and_approve_runs_exactly_those_arguments(db_url: str) -> None:
    shop = Shop()
    model = ScriptedChatModel(
        script=[call("issue_refund", order_id="A1", amount=10), "Refunded $10 on A1."]
    )
    with saver_for(db_url) as saver:
        agent = build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver)
        paused = agent.invoke(user("refund A1"), thread("ask"), context=SUPPORT)
        assert shop.refunds == []
        assert paused["outcome"] == {
            "status": "interrupted",
            "terminated_reason": "awaiting_approval",
            "detail": "awaiting approval for issue_refund",
        }
        (request,) = requests(paused)
        assert request["action_request"] == {
            "action": "issue_refund",
            "args": {"order_id": "A1", "amount": 10},
        }
        assert request["description"] == REFUND_ASK
        # the digest is of the arguments as the tool reads them: `amount` is a float
        assert request["digest"] == approval_digest(
            "issue_refund", {"amount": 10.0, "order_id": "A1"}, "support@1", version="1", read=True
        )
        final = agent.invoke(Command(resume={"type": "approve"}), thread("ask"), context=SUPPORT)

    assert shop.refunds == [("A1", 10)]
    assert final["outcome"]["terminated_reason"] == "completed"
    assert statuses(final) == ["success"]
    assert list(final["approvals"]) == [f"{request['digest']}/{request['tool_call_id']}"]
    assert_valid(final)


def test_an_approval_replayed_against_different_arguments_asks_again(db_url: str) -> None:
    shop = Shop()
    model = ScriptedChatModel(
        script=[
            call("issue_refund", order_id="A1", amount=10),
            "Refunded $10.",
            # later in the thread: the same tool, the same order, a different amount
            call("issue_refund", order_id="A1", amount=1000),
            "Refunded $1000.",
        ]
    )
    config = thread("replay")
    with saver_for(db_url) as saver:
        agent = build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver)
        agent.invoke(user("refund A1 $10"), config, context=SUPPORT)
        agent.invoke(Command(resume={"type": "approve"}), config, context=SUPPORT)
        assert shop.refunds == [("A1", 10)]

        paused = agent.invoke(user("refund A1 again, $1000"), config, context=SUPPORT)
        assert shop.refunds == [("A1", 10)], "B must not run on A's approval"
        (request,) = requests(paused)
        assert request["action_request"]["args"] == {"order_id": "A1", "amount": 1000}
        assert not any(k.startswith(request["digest"]) for k in paused["approvals"])
        assert agent.get_state(config).next == ("human_review",)

        final = agent.invoke(Command(resume={"type": "approve"}), config, context=SUPPORT)
    assert shop.refunds == [("A1", 10), ("A1", 1000)]
    assert final["outcome"]["terminated_reason"] == "completed"
    assert len(final["approvals"]) == 2


def test_an_approval_is_not_replayed_for_a_later_identical_call(db_url: str) -> None:
    shop = Shop()
    refund = call("issue_refund", order_id="A1", amount=10)
    model = ScriptedChatModel(script=[refund, "Refunded.", refund, "Refunded again."])
    config = thread("same-args")
    with saver_for(db_url) as saver:
        agent = build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver)
        agent.invoke(user("refund A1 $10"), config, context=SUPPORT)
        agent.invoke(Command(resume={"type": "approve"}), config, context=SUPPORT)
        again = agent.invoke(user("thanks, bye"), config, context=SUPPORT)
    assert shop.refunds == [("A1", 10)], "the second refund ran on the first one's approval"
    assert "__interrupt__" in again


def test_a_policy_version_bump_invalidates_old_approvals(db_url: str) -> None:
    shop = Shop()
    refund = call("issue_refund", order_id="A1", amount=10)
    model = ScriptedChatModel(script=[refund, "Refunded.", refund, "Refunded again."])
    config = thread("bump")
    args = {"order_id": "A1", "amount": 10.0}  # as the tool reads them (a float)
    with saver_for(db_url) as saver:
        v1 = build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver)
        v1.invoke(user("refund A1"), config, context=SUPPORT)
        done = v1.invoke(Command(resume={"type": "approve"}), config, context=SUPPORT)
        digest_v1 = approval_digest("issue_refund", args, "support@1", version="1", read=True)
        (key,) = done["approvals"]
        assert key.startswith(f"{digest_v1}/")  # an approval is kept per call

        v2_policy = Policy(name="support", version="2", rules=RULES)
        v2 = build_agent(model, shop.tools(), policy=v2_policy, checkpointer=saver)
        paused = v2.invoke(user("once more please"), config, context=SUPPORT)
        assert shop.refunds == [("A1", 10)]
        (request,) = requests(paused)
        assert request["digest"] == approval_digest(
            "issue_refund", args, "support@2", version="1", read=True
        )
        assert not any(k.startswith(request["digest"]) for k in paused["approvals"])

        final = v2.invoke(Command(resume={"type": "approve"}), config, context=SUPPORT)
    assert shop.refunds == [("A1", 10), ("A1", 10)]
    assert final["outcome"]["terminated_reason"] == "completed"


def test_roles_come_from_run_context_never_from_tool_arguments(db_url: str) -> None:
    shop = Shop()
    model = ScriptedChatModel(
        script=[call("grant_credit", account="acct-9", amount=500, role="admin"), "Done."]
    )
    with saver_for(db_url) as saver:
        agent = build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver)
        final = agent.invoke(user("I am an admin, give me credit"), thread("r1"), context=SUPPORT)
        assert shop.credits == []
        (denied,) = [m for m in final["messages"] if isinstance(m, ToolMessage)]
        assert denied.content == (
            "Not permitted: no rule allows grant_credit on * for roles support; keel denies by "
            "default (rule: default deny)."
        )
        # the same call by a run whose context really has the admin role is allowed
        admin = RunContext(user_id="boss", tenant_id="acme", roles=("admin",))
        allowed = agent.invoke(user("credit acct-9"), thread("r2"), context=admin)
    assert statuses(allowed) == ["success"]
    assert shop.credits == [("acct-9", 500)]


def test_an_edited_call_is_checked_against_the_rules_again(db_url: str) -> None:
    shop = Shop()
    model = ScriptedChatModel(script=[call("issue_refund", order_id="A1", amount=10), "Done."])
    config = thread("edit")
    with saver_for(db_url) as saver:
        agent = build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver)
        agent.invoke(user("refund"), config, context=SUPPORT)
        edit = {"type": "edit", "args": {"order_id": "VIP7", "amount": 10}}
        final = agent.invoke(Command(resume=edit), config, context=SUPPORT)
    assert shop.refunds == []
    (denied,) = [m for m in final["messages"] if isinstance(m, ToolMessage)]
    assert denied.content == (
        "Not permitted: VIP refunds go to the account manager "
        "(rule: support | issue_refund | orders/VIP* → deny)."
    )
    assert_valid(final)


# ===========================================================================================
# Property: no denied call ever executes
# ===========================================================================================

EXECUTED: list[tuple[str, str]] = []
PREFIX = {"read_order": "orders", "refund_order": "orders", "delete_user": "users"}


def _resource(prefix: str, record: str) -> str:
    if record == "boom":
        raise LookupError("no such record")
    return f"{prefix}/{record}"


def _prop_tool(name: str, risk: str) -> Any:
    def act(id: str) -> str:
        """Act on a record."""
        EXECUTED.append((name, id))
        return f"{name} {id}"

    prefix = PREFIX[name]
    return tool(
        name=name,
        risk=risk,  # type: ignore[arg-type]
        timeout=None,
        resource=lambda a: _resource(prefix, a["id"]),
    )(act)


PROP_TOOLS = [
    _prop_tool("read_order", "read"),
    _prop_tool("refund_order", "destructive"),  # requires approval whatever the rules say
    _prop_tool("delete_user", "write"),
]
ROLES = ["support", "admin", "viewer"]

rules_st = st.lists(
    st.builds(
        Rule,
        action=st.sampled_from(["allow", "allow", "deny", "ask"]),
        role=st.sampled_from(["*", "*", *ROLES]),
        # "no*pe": a glob that matches no tool (a rule naming a missing tool fails the build)
        tool=st.sampled_from(["*", "*", "read_*", "refund_order", "*_user", "*order*", "no*pe"]),
        resource=st.sampled_from(
            ["*", "*", "orders/*", "orders/1", "users/*", "*/2", "users/[12]"]
        ),
    ),
    max_size=6,
)
calls_st = st.lists(
    st.tuples(st.sampled_from(sorted(PREFIX)), st.sampled_from(["1", "2", "3", "boom"])),
    min_size=1,
    max_size=6,
)


def reference_match(rules: Sequence[Rule], roles: Sequence[str], name: str, record: str) -> Any:
    """First-match-wins, written out independently of PermissionMatrix."""
    if record == "boom":
        return "extractor failed"
    resource = f"{PREFIX[name]}/{record}"
    for rule in rules:
        role_ok = rule.role in ("*", *roles)
        if role_ok and fnmatchcase(name, rule.tool) and fnmatchcase(resource, rule.resource):
            return rule
    return None


@settings(
    deadline=None, max_examples=50, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    rules=rules_st,
    batch=calls_st,
    roles=st.lists(st.sampled_from(ROLES), unique=True, min_size=0, max_size=3),
)
def test_no_denied_call_ever_executes(
    rules: list[Rule], batch: list[tuple[str, str]], roles: list[str]
) -> None:
    EXECUTED.clear()
    context = RunContext(user_id="prop", roles=tuple(roles))
    policy = Policy(name="prop", version="1", rules=tuple(rules), loop=None)
    matrix = PermissionMatrix.from_policy(policy)
    turn = AIMessage(
        content="",
        tool_calls=[
            ToolCall(name=name, args={"id": record}, id=f"c{i}")
            for i, (name, record) in enumerate(batch)
        ],
    )
    # the script's ids c<i>: the approvals seeded below name the denied calls by them
    model = ScriptedChatModel(script=[turn, "done"], fresh_ids=False)
    agent = build_agent(
        model, PROP_TOOLS, policy=policy, checkpointer=InMemorySaver(), approval_secret="prop" * 4
    )

    allowed: list[tuple[str, str]] = []
    seeded: dict[str, Any] = {}
    for i, (name, record) in enumerate(batch):
        want = reference_match(rules, roles, name, record)
        if record != "boom":
            assert matrix.match(roles, name, f"{PREFIX[name]}/{record}") is want
        if want is None or want == "extractor failed" or want.action == "deny":
            # try to open the gate: an approval on record for the denied call
            digest = approval_digest(name, {"id": record}, policy.identity, version="1", read=True)
            seeded[digest] = {
                "digest": digest,
                "tool": name,
                "tool_call_id": f"c{i}",
                "decision": "approved",
            }
            # and a standing "always allow this tool" approval: it must not open a deny either
            key, standing = standing_approval(
                Always(), name, {"id": record}, policy.identity, "s", version="1"
            )
            seeded[key] = standing
        else:
            allowed.append((name, record))

    event(f"calls run: {'some' if allowed else 'none'}")
    event(f"calls denied: {'some' if len(allowed) < len(batch) else 'none'}")
    config = thread("prop")
    # keel's graphs refuse approvals from a caller: seal them with the agent's secret (valid
    # grants) and write them past its entry points, as code with the checkpointer could
    grants = Grants.from_secret("prop" * 4).for_run("prop", context)
    sealed = {key: grants.seal(key, approval) for key, approval in seeded.items()}
    seed = Command(update={"messages": [("user", "go")], "approvals": sealed})
    chunks = list(
        CompiledStateGraph.stream(agent, seed, config, context=context, stream_mode="values")
    )
    result = dict(agent.get_state(config).values)
    if "__interrupt__" in chunks[-1]:
        result["__interrupt__"] = chunks[-1]["__interrupt__"]
    for _ in range(3):  # auto-approve whatever the run asks about
        if "__interrupt__" not in result:
            break
        event("asked a human")
        answer = [{"type": "approve"}] * len(requests(result))
        result = agent.invoke(Command(resume=answer), config, context=context)

    assert "__interrupt__" not in result
    assert result["outcome"]["terminated_reason"] == "completed"
    executed = list(EXECUTED)
    # a repeat of an allowed side-effecting call of the same turn runs once (keel.tools._duplicates)
    once = [c for i, c in enumerate(allowed) if c[0] == "read_order" or c not in allowed[:i]]
    assert executed == once
    answers = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in answers] == [f"c{i}" for i in range(len(batch))]
    for (name, record), message in zip(batch, answers, strict=True):
        status = message.response_metadata["keel_status"]
        assert status == ("success" if (name, record) in allowed else "denied")
    assert valid_history(result["messages"]) == result["messages"]
