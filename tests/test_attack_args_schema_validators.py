"""Attacks through a tool's `args_schema` whose validators normalize the model's arguments.

keel reads a call's arguments as the tool reads them (`keel.tools._args`): for the permission
rules' resource, the approvals' digests, the ledger's claim, the duplicate check and the loop
guard. It read them through LangChain's `tool_call_schema`, which copies the `args_schema`'s
fields but none of its validators (`field_validator`, `model_validator`) nor its config
(`str_strip_whitespace`, `str_to_lower`, ...; pinned in `tests/test_middleware_parity.py`). A
tool whose `args_schema` canonicalizes an account id (strip, lowercase) runs `" ADMIN"` as
`admin`, and keel decided on `" ADMIN"`:

- a `deny` on resource `acct:admin*` let `" ADMIN"` through (resource `acct: ADMIN`), under
  `build_agent` and under `PermissionMiddleware`; the tool closed the admin account;
- a human's rejection of `admin` did not answer `" Admin "`: the reviewer was asked again;
- a turn asking for `bob` and `" BOB "` closed the account twice (not one call and its
  duplicate); after a crash right after the effect, the model asking again spelled `" BOB"`
  ran it a second time instead of asking "did this happen?";
- a model alternating `bob`, `" Bob"`, `"BOB "` slipped past the loop guard;
- a validator that refuses (or crashes on) the arguments let keel gate, ask about and claim a
  call the tool then refused.

keel now reads the arguments with the `args_schema` itself when its validators or config read
them otherwise, injected parameters left out.

Nearby, with no validator at all: a default made by a factory at each reading
(`Field(default_factory=now)`) made every reading of one call another, so an approved call
never ran (`needs_approval`), and no repeat was a duplicate or a loop. Such a default the model
left out is no longer part of the call; a constant one (`default_factory=list`) still is.

Real parts: SQLite files and PostgreSQL (checkpointer and ledger), a real process killed by
SIGKILL; the model is keel's `ScriptedChatModel` with fresh tool-call ids.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import pytest
from forking import ForkServer
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langgraph.prebuilt import InjectedState
from langgraph.types import Command
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel
from keel.guards import LoopPolicy, PermissionMiddleware, Policy, Rule
from keel.tools import KeelTool, ToolRegistry, ToolSpec
from keel.tools._args import as_called

CTX = RunContext(user_id="u1", roles=("support",))
THREAD: Any = {"configurable": {"thread_id": "t"}}
DENY_ADMIN = Policy(
    rules=(
        Rule(role="*", tool="close_account", resource="acct:admin*", action="deny"),
        Rule(role="*", action="allow"),
    )
)
ASK = Policy(rules=(Rule(role="*", tool="close_account", action="ask", reason="a human"),))


class FieldCanon(BaseModel):
    """An account id canonicalized by a field validator."""

    account: str
    note: str = ""

    @field_validator("account")
    @classmethod
    def _canonical(cls, account: str) -> str:
        return account.strip().lower()


class BeforeCanon(BaseModel):
    """The same, by a model validator on the raw arguments."""

    account: str
    note: str = ""

    @model_validator(mode="before")
    @classmethod
    def _canonical(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("account"), str):
            return {**data, "account": data["account"].strip().lower()}
        return data


class ConfigCanon(BaseModel):
    """The same, by the model's config."""

    model_config = ConfigDict(str_strip_whitespace=True, str_to_lower=True)
    account: str
    note: str = ""


SCHEMAS = [FieldCanon, BeforeCanon, ConfigCanon]
IDS = ["field_validator", "model_validator", "config"]


def closer(schema: type[BaseModel], closed: list[str], risk: str = "write") -> KeelTool:
    """`close_account` reading its arguments with `schema`; each account it closed in `closed`."""

    def close_account(account: str, note: str = "") -> str:
        closed.append(account)
        return f"closed {account}"

    spec = ToolSpec(risk=risk, resource=lambda a: f"acct:{a['account']}")  # type: ignore[arg-type]
    return KeelTool.from_function(  # type: ignore[return-value]
        func=close_account,
        name="close_account",
        description="Close an account.",
        args_schema=schema,
        spec=spec,
    )


def call(name: str, args: dict[str, Any]) -> ToolCall:
    return ToolCall(name=name, args=args, id=None)


def call_turn(name: str, *args: dict[str, Any]) -> AIMessage:
    return AIMessage("", tool_calls=[call(name, a) for a in args])


def turn(*args: dict[str, Any]) -> AIMessage:
    return call_turn("close_account", *args)


def replies(result: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage)]


def statuses(result: dict[str, Any]) -> list[str]:
    return [m.response_metadata.get("keel_status") for m in replies(result)]


def ask(agent: Any, text: str) -> dict[str, Any]:
    result: dict[str, Any] = agent.invoke({"messages": [("user", text)]}, THREAD, context=CTX)
    return result


@pytest.fixture
def agent_of(db_url: str) -> Iterator[Callable[..., Any]]:
    """`agent_of(tools, script, **build_agent's)`: keel's agent on `db_url`'s checkpointer."""
    with Persistence(db_url).checkpointer() as saver:

        def make(tools: Any, script: list[Any], **kwargs: Any) -> Any:
            model = ScriptedChatModel(script=script, fresh_ids=True)
            return build_agent(model, tools, checkpointer=saver, **kwargs)

        yield make


# -- a deny on a resource -------------------------------------------------------------------------


@pytest.mark.parametrize("schema", SCHEMAS, ids=IDS)
def test_a_deny_on_a_resource_holds_for_a_spelling_the_tool_normalizes(
    schema: type[BaseModel], agent_of: Callable[..., Any]
) -> None:
    """The attack: `" ADMIN"` (resource `acct: ADMIN`) passed the `deny` on `acct:admin*` and
    the tool closed `admin`. The resource is read from the arguments as the tool reads them."""
    closed: list[str] = []
    script = [turn({"account": " ADMIN"}), turn({"account": "Bob "}), "done"]
    agent = agent_of([closer(schema, closed)], script, policy=DENY_ADMIN)
    done = ask(agent, "close the admin account, then bob's")
    assert statuses(done) == ["denied", "success"]
    assert closed == ["bob"]


@pytest.mark.parametrize("schema", SCHEMAS, ids=IDS)
async def test_permission_middleware_reads_the_resource_as_the_tool_does(
    schema: type[BaseModel],
) -> None:
    """The same attack on `create_agent` with `PermissionMiddleware`."""
    closed: list[str] = []
    model = ScriptedChatModel(script=[turn({"account": " ADMIN"}), "done"], fresh_ids=True)
    agent = create_agent(
        model,
        [closer(schema, closed)],
        middleware=[PermissionMiddleware(DENY_ADMIN)],
        context_schema=RunContext,
    )
    done = await agent.ainvoke({"messages": [("user", "close admin")]}, context=CTX)
    assert closed == []
    (reply,) = replies(done)
    assert reply.response_metadata["keel_status"] == "denied"


def test_a_tool_with_injected_state_reads_the_resource_as_the_tool_does(
    agent_of: Callable[..., Any],
) -> None:
    """An `args_schema` with an injected parameter (`InjectedState`): keel reads the model's
    arguments with the schema's validator, the injected one left out; the tool still gets the
    state."""
    closed: list[str] = []

    class WithState(FieldCanon):
        state: Annotated[dict[str, Any], InjectedState]

    def close_account(account: str, state: dict[str, Any], note: str = "") -> str:
        closed.append(f"{account} after {len(state['messages'])} messages")
        return f"closed {account}"

    spec = ToolSpec(risk="write", resource=lambda a: f"acct:{a['account']}")
    closes = KeelTool.from_function(
        func=close_account,
        name="close_account",
        description="Close an account.",
        args_schema=WithState,
        spec=spec,
    )
    script = [turn({"account": " ADMIN"}, {"account": "Bob"}), "done"]
    done = ask(agent_of([closes], script, policy=DENY_ADMIN), "close admin and bob")
    assert statuses(done) == ["denied", "success"]
    assert closed == ["bob after 2 messages"]


def test_a_deny_on_a_resource_holds_for_a_number_spelled_otherwise(
    agent_of: Callable[..., Any],
) -> None:
    """No validator: an `int` order id. `5.0` and `"05"` (resources `orders/5.0`,
    `orders/05`) passed the `deny` on `orders/5`; the tool refunds order 5 for both."""
    refunded: list[int] = []

    @tool(risk="write", resource=lambda a: f"orders/{a['order_id']}")
    def refund(order_id: int) -> str:
        """Refund an order."""
        refunded.append(order_id)
        return "refunded"

    policy = Policy(
        rules=(
            Rule(role="*", tool="refund", resource="orders/5", action="deny"),
            Rule(role="*", action="allow"),
        )
    )
    spellings = [{"order_id": 5.0}, {"order_id": "05"}, {"order_id": 6}]
    script = [AIMessage("", tool_calls=[call("refund", a) for a in spellings]), "done"]
    done = ask(agent_of([refund], script, policy=policy), "refund 5 and 6")
    assert statuses(done) == ["denied", "denied", "success"]
    assert refunded == [6]


# -- approvals --------------------------------------------------------------------------------


def test_a_rejection_answers_a_spelling_the_tool_normalizes_alike(
    agent_of: Callable[..., Any],
) -> None:
    """A human rejected closing `admin`; the model asked again, `" Admin "`: the reviewer was
    asked again (and could approve what they rejected). It is answered `rejected` at once."""
    closed: list[str] = []
    script = [turn({"account": "admin"}), "ok", turn({"account": " Admin "}), "done"]
    agent = agent_of([closer(FieldCanon, closed)], script, policy=ASK)
    assert ask(agent, "close admin")["outcome"]["status"] == "interrupted"
    agent.invoke(Command(resume={"type": "reject"}), THREAD, context=CTX)
    again = ask(agent, "please, close admin")
    assert "__interrupt__" not in again, "the reviewer was asked again"
    assert statuses(again)[-1] == "rejected"
    assert closed == []


def test_a_same_args_approval_covers_no_account_the_tool_reads_otherwise(
    agent_of: Callable[..., Any],
) -> None:
    """A `same_args` standing approval of closing `bob` covers `" BOB"` (the tool closes
    `bob`) and not `bobby`."""
    closed: list[str] = []
    script = [
        turn({"account": "bob"}),
        "ok",
        turn({"account": " BOB"}),
        "again",
        turn({"account": "bobby"}),
        "done",
    ]
    agent = agent_of([closer(FieldCanon, closed)], script, policy=ASK)
    ask(agent, "close bob")
    agent.invoke(
        Command(resume={"type": "approve", "always": {"same_args": True}}), THREAD, context=CTX
    )
    assert "__interrupt__" not in ask(agent, "close bob again")
    assert closed == ["bob", "bob"]
    paused = ask(agent, "close bobby")
    (request,) = paused["__interrupt__"][0].value
    assert request["action_request"]["args"] == {"account": "bobby"}


# -- at most once ------------------------------------------------------------------------------


def test_one_turn_asking_twice_in_two_spellings_closes_the_account_once(
    agent_of: Callable[..., Any], ledger: Ledger
) -> None:
    """`bob` and `" BOB "` in one turn: the tool would run both as `bob`; the second is the
    first one's duplicate and does not run."""
    closed: list[str] = []
    script = [turn({"account": "bob"}, {"account": " BOB "}), "done"]
    done = ask(agent_of([closer(FieldCanon, closed)], script, ledger=ledger), "close bob")
    assert closed == ["bob"]
    second = replies(done)[1]
    assert second.response_metadata["keel_duplicate_of"] == replies(done)[0].tool_call_id


class Masked(FieldCanon):
    """An `args_schema` that masks the account when it writes itself (for its own logs)."""

    @field_serializer("account")
    def _masked(self, account: str) -> str:
        return account[:2] + "***"


def test_two_accounts_a_schema_writes_alike_are_two_calls(
    agent_of: Callable[..., Any], ledger: Ledger
) -> None:
    """keel writes the arguments the tool's schema read without the schema's serializers:
    `bob1` and `bob2`, both written `bo***` by the schema, are two calls, both run."""
    closed: list[str] = []
    script = [turn({"account": " Bob1"}, {"account": "bob2"}), "done"]
    done = ask(agent_of([closer(Masked, closed)], script, ledger=ledger), "close both")
    assert statuses(done) == ["success", "success"]
    assert closed == ["bob1", "bob2"]


CHILD = textwrap.dedent(
    """
    import json, os, signal, sys

    from langchain_core.messages import AIMessage, ToolCall
    from pydantic import BaseModel, field_validator

    from keel import Ledger, Persistence, RunContext, build_agent
    from keel.evals import ScriptedChatModel
    from keel.tools import KeelTool, ToolSpec

    url, effects, spelled = sys.argv[1:]


    class Account(BaseModel):
        account: str
        note: str = ""

        @field_validator("account")
        @classmethod
        def _canonical(cls, account):
            return account.strip().lower()


    def close_account(account, note=""):
        with open(effects, "a") as f:
            print("closed", account, file=f, flush=True)
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)  # after the effect, before its record


    tool = KeelTool.from_function(
        func=close_account, name="close_account", description="Close an account.",
        args_schema=Account, spec=ToolSpec(risk="write"),
    )
    calls = [ToolCall(name="close_account", args=json.loads(spelled), id=None)]
    model = ScriptedChatModel(script=[AIMessage("", tool_calls=calls)], fresh_ids=True)
    with Persistence(url).checkpointer() as saver:
        agent = build_agent(model, [tool], checkpointer=saver, ledger=Ledger(url))
        agent.invoke(
            {"messages": [("user", "close bob")]}, {"configurable": {"thread_id": "t"}},
            context=RunContext(user_id="u1", roles=("support",)), durability="exit",
        )
    """
)


def test_a_crashed_close_asked_again_spelled_anew_is_asked_about_not_run_twice(
    forks: ForkServer, agent_of: Callable[..., Any], ledger: Ledger, db_url: str, tmp_path: Path
) -> None:
    """A process is SIGKILLed right after closing `bob` (its ledger row `started`, nothing of
    the run saved). The model asks again under a fresh id, spelled `" BOB"`: the ledger's
    digest of `{"account": " BOB"}` did not find the lost call, and the account was closed
    a second time. The call adopts the orphan and asks "did this happen?"."""
    effects = tmp_path / "effects.txt"
    forks.killed_code(CHILD, db_url, str(effects), json.dumps({"account": "bob"}))
    assert effects.read_text().splitlines() == ["closed bob"]
    closed: list[str] = []
    script = [turn({"account": " BOB"}), "done"]
    paused = ask(agent_of([closer(FieldCanon, closed)], script, ledger=ledger), "close bob")
    assert closed == []
    (request,) = paused["__interrupt__"][0].value
    assert request.get("kind") == "outcome_unknown"


# -- the loop guard ------------------------------------------------------------------------------


def test_the_loop_guard_reads_arguments_as_the_tool_does(agent_of: Callable[..., Any]) -> None:
    """`bob`, `" Bob"`, `"BOB "`: the tool closes `bob` three times in a row, a loop
    (`max_repeats=3`); the third never runs."""
    closed: list[str] = []
    spellings = [{"account": "bob"}, {"account": " Bob"}, {"account": "BOB "}]
    script: list[Any] = [turn(a) for a in spellings] + ["done"] * 3
    policy = Policy(rules=(Rule(action="allow"),), loop=LoopPolicy(on_loop="stop"))
    done = ask(agent_of([closer(FieldCanon, closed, risk="read")], script, policy=policy), "bob")
    assert done["outcome"]["terminated_reason"] == "loop_detected", done["outcome"]
    assert closed == ["bob", "bob"]


# -- a validator that refuses ----------------------------------------------------------------------


class NoRoot(BaseModel):
    account: str

    @field_validator("account")
    @classmethod
    def _not_root(cls, account: str) -> str:
        if account.strip().lower() == "root":
            raise ValueError("root is never closed")
        return account


class Buggy(BaseModel):
    account: str

    @model_validator(mode="after")
    def _bug(self) -> Buggy:
        _ = 1 // len(self.account.strip())  # the developer's bug: a blank account divides by 0
        return self


class Exact(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    account: str
    note: str = ""
    count: int = 1


@pytest.mark.parametrize(
    ("schema", "args", "why"),
    [
        (NoRoot, {"account": " Root"}, "root is never closed"),
        (Buggy, {"account": "  "}, "ZeroDivisionError"),
        (Exact, {"account": "bob", "force": True}, "force: Extra inputs are not permitted"),
        (Exact, {"account": "bob", "count": "5"}, "count: Input should be a valid integer"),
    ],
    ids=["refuses", "crashes", "extra-forbid", "strict"],
)
def test_a_call_the_args_schema_refuses_is_invalid_args_before_any_human_is_asked(
    schema: type[BaseModel], args: dict[str, Any], why: str, agent_of: Callable[..., Any]
) -> None:
    """The tool's `args_schema` refuses the arguments (or its validator crashes on them): keel
    asked a human about a call that could never run. It is answered `invalid_args` saying
    why; the run goes on."""
    closed: list[str] = []
    script = [turn(args), "done"]
    done = ask(agent_of([closer(schema, closed)], script, policy=ASK), "close it")
    assert "__interrupt__" not in done
    assert done["outcome"]["terminated_reason"] == "completed"
    (reply,) = replies(done)
    assert reply.response_metadata["keel_status"] == "invalid_args"
    assert why in reply.text
    assert closed == []


# -- a default made anew at each read -----------------------------------------------------------


def booker(booked: list[str]) -> Any:
    """`book`, whose `at` is left to a default factory: the time of each reading."""

    @tool(risk="write")
    def book(room: str, at: Annotated[datetime, Field(default_factory=_now)]) -> str:
        """Book a room."""
        booked.append(room)
        return f"booked {room}"

    return book


def _now() -> datetime:
    return datetime.now(UTC)


def test_an_approved_call_with_a_default_factory_runs(agent_of: Callable[..., Any]) -> None:
    """A human approves `book(room="r1")`: the approval is bound to the arguments as the tool
    reads them, which held a new time at each reading."""
    booked: list[str] = []
    policy = Policy(rules=(Rule(role="*", tool="book", action="ask", reason="a human"),))
    agent = agent_of([booker(booked)], [call_turn("book", {"room": "r1"}), "done"], policy=policy)
    assert ask(agent, "book r1")["outcome"]["status"] == "interrupted"
    done = agent.invoke(Command(resume={"type": "approve"}), THREAD, context=CTX)
    assert statuses(done) == ["success"]
    assert booked == ["r1"]


def test_calls_with_a_default_factory_repeat_for_the_loop_guard_and_the_duplicate_check(
    agent_of: Callable[..., Any], ledger: Ledger
) -> None:
    """`book(room="r1")` twice in a turn: one booking and its duplicate, not two bookings;
    asked a third time, a loop (`max_repeats=3`), not a third booking."""
    booked: list[str] = []
    twice = call_turn("book", {"room": "r1"}, {"room": "r1"})
    script: list[Any] = [twice, call_turn("book", {"room": "r1"}), "done", "done"]
    policy = Policy(rules=(Rule(action="allow"),), loop=LoopPolicy(on_loop="stop"))
    done = ask(agent_of([booker(booked)], script, policy=policy, ledger=ledger), "book r1")
    first, second, *_ = replies(done)
    assert statuses(done) == ["success", "success", "not_run"]
    assert second.response_metadata["keel_duplicate_of"] == first.tool_call_id
    assert done["outcome"]["terminated_reason"] == "loop_detected", done["outcome"]
    assert booked == ["r1"]


def test_a_default_made_anew_is_left_out_and_a_constant_one_kept() -> None:
    """keel's reading of `book(room="r1")` is one: its `at` left out; a constant factory's
    default (`tags=[]`) is read as before (the digests keel stored stay the same)."""

    @tool
    def tag(room: str, tags: Annotated[list[str], Field(default_factory=list)]) -> str:
        """Tag a room."""
        return room

    tools = ToolRegistry([booker([]), tag])
    book, tagged = tools.get("book"), tools.get("tag")
    assert book is not None and tagged is not None
    assert as_called(book, {"room": "r1"}) == {"room": "r1"}
    when = "2026-01-01T00:00:00Z"
    assert as_called(book, {"room": "r1", "at": when}) == {"room": "r1", "at": when}
    assert as_called(tagged, {"room": "r1"}) == {"room": "r1", "tags": []}
