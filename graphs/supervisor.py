"""`build_supervisor`: route a task to focused keel agents and pass their results back.

```
START → route ─┬─ agent "support" ─┐
       ▲       ├─ agent "billing" ─┤  (each a whole keel agent: its own tools, policy, budget)
       │       └─ FINISH → END     │
       └────── result ◄────────────┘   a stopped / failed agent ends the run with its outcome
```

Each agent runs as a subgraph called inside its node, on a fresh conversation holding only the
task the router gave it, so its guards, budget and approvals apply unchanged; the supervisor's
run budget holds it too (`keel.guards.budget.holding_outer`). Its approval
`interrupt()` surfaces to the supervisor's caller, and `Command(resume=...)` on the supervisor's
thread resumes it. Its answer comes back as an `AIMessage` named after the agent; its usage and
approvals are added to the supervisor's.

While a sub-agent waits for a human, the supervisor's thread shows the agent's review requests
as its interrupts (`snapshot.interrupts`, `state["tasks"][i]["interrupts"]` on the server) and
`next == (agent name,)`, and its `outcome` is the waiting agent's (`interrupted /
awaiting_approval`, what it waits for: `keel.graphs._paused`, as LangGraph writes nothing of a
node that pauses).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, cast

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.errors import GraphBubbleUp
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore
from langgraph.types import RetryPolicy
from pydantic import BaseModel, Field

from keel import outcome
from keel._drive import Steps
from keel._node import context_of, make_node, steps_node
from keel.db.audit import AuditLog
from keel.db.ledger import Ledger
from keel.errors import UserError
from keel.graphs._one_run import ThreadLeases
from keel.graphs._pending import ToolLookup
from keel.graphs._storage import Recorder
from keel.graphs.agent import Agent
from keel.graphs.threads import guarded
from keel.guards.admission import Admission
from keel.guards.budget import OuterBudget, check_budget, holding_outer
from keel.guards.model_call import (
    DEFAULT_MODEL_RETRY,
    GuardedModel,
    ModelAnswer,
    ModelCallGuards,
    ModelTimeoutPolicy,
)
from keel.guards.policy import Budget, Policy
from keel.history import valid_history
from keel.models import model_name_of
from keel.observe.observer import Observer, paused, recorded
from keel.pricing import PriceTable
from keel.state import (
    AgentInput,
    AgentState,
    Outcome,
    RunContext,
    Usage,
    add_usage,
    run_usage,
    task_clock,
    task_start,
)
from keel.tools.registry import RegisteredTool
from keel.versions import AgentVersion, prompt_hash

__all__ = ["FINISH", "Route", "build_supervisor"]

FINISH = "FINISH"
"""The router's answer when the task is done."""


class Route(BaseModel):
    """The router's decision: which agent gets which task next, or `FINISH`."""

    agent: str = Field(description="The agent to hand the task to, or FINISH when it is done.")
    task: str = Field(default="", description="The task for that agent, in your own words.")


class SupervisorState(AgentState, total=False):
    """`AgentState` plus the router's pending decision and the number of hand-offs so far."""

    route: dict[str, str] | None
    handoffs: int


Supervisor = CompiledStateGraph[SupervisorState, RunContext, AgentInput, SupervisorState]

Router = Callable[[Sequence[BaseMessage]], Route]


def build_supervisor(
    agents: Mapping[str, Agent],
    router: str | BaseChatModel | Router,
    *,
    descriptions: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    max_handoffs: int = 4,
    policy: Policy | None = None,
    ledger: Ledger | None = None,
    prices: PriceTable | None = None,
    model_retry: RetryPolicy = DEFAULT_MODEL_RETRY,
    model_timeout: float | timedelta | ModelTimeoutPolicy | None = None,
    checkpointer: BaseCheckpointSaver[Any] | None = None,
    store: BaseStore | None = None,
    name: str = "keel_supervisor",
    version: str | None = None,
) -> Supervisor:
    """Build a supervisor that routes a task to focused agents (each built with `build_agent`).

    Args:
        agents: The agents by name; compile them without a checkpointer (they use the
            supervisor's).
        router: A chat model (asked for a structured `Route`), a `provider:name` string, or a
            function `messages -> Route`.
        descriptions: One line per agent name, shown to the routing model.
        system_prompt: Extra routing instructions.
        max_handoffs: Hand-offs allowed per task; then the run stops as `budget_exceeded`.
            A router that fails (or picks an unknown agent) ends the run as `error`.
        policy: Holds the routing model's calls to the policy's run budget (over the
            supervisor's usage, which includes its agents'), period budgets, rate limits and
            model breaker; a route whose own call spent the run budget is not followed (the
            run stops as `budget_exceeded`). The run budget holds the agents too, before each
            of their model turns and tool steps (with what the supervisor spent before the
            hand-off); its period budgets, rate limits and breaker do not (an agent's calls
            reach a period budget's ledger row only through a period budget of its own). The
            agents keep their own policies.
        ledger: keel's ledger, needed by a policy with period budgets, rate limits, breakers
            or admission control (`Policy.admission`: caps on the supervisor's runs).
        prices: The price table for the router's USD accounting.
        model_retry: Retries of a failed routing call.
        model_timeout: A deadline for each attempt of a routing call.
        checkpointer: A LangGraph checkpointer; needed for the agents' approvals.
        store: A LangGraph store, passed on to the agents.
        name: The graph's name.
        version: Your label for this version of the supervisor (`"v2"`). Its run records
            and audit records name the version that served each run, as an agent's do: this
            label (or an `auto-<digest>` id), the router's model, a hash of the routing
            prompt (agents, descriptions, `system_prompt`), each agent's version (by agent
            name) and the policy version (`keel.versions.AgentVersion`).

    Example:
        ```python
        from keel.evals import ScriptedChatModel
        from keel.graphs import Route, build_agent, build_supervisor

        support = build_agent(ScriptedChatModel(script=["It shipped yesterday."]))
        sup = build_supervisor(
            {"support": support},
            lambda messages: Route(agent="FINISH" if len(messages) > 1 else "support"),
        )
        result = sup.invoke({"messages": [("user", "Where is my order?")]})
        assert result["messages"][-1].text == "It shipped yesterday."
        ```
    """
    _validate(agents, router, max_handoffs)
    if callable(router) and not isinstance(router, BaseChatModel):
        ask: Router | GuardedModel = router
    else:
        guards = ModelCallGuards.from_policy(
            policy,
            ledger,
            prices=prices,
            retry=model_retry,
            timeout=model_timeout,
            caller="build_supervisor",
        )
        ask = GuardedModel([router], schema=Route, guards=guards)
    prompt = _prompt(agents, descriptions or {}, system_prompt)
    served = _version(agents, router, prompt, policy, version)
    # an agent's run a new message finds stopped mid-step is recorded by the agent's recorder
    recorders = {n: r for n, a in agents.items() if (r := _recorder(a)) is not None}
    # with a ledger the supervisor's own run is recorded as an agent's is (`keel.observe`); its
    # run end reports the orphans its agents' side-effecting calls left in its thread (a task
    # handed to no agent that looks, or to none), not its pauses (`Observer.orphans_paused`)
    observer = (
        None
        if ledger is None
        else Observer(
            ledger,
            graph=name,
            policy_name=policy.name if policy is not None else None,
            policy_version=policy.version if policy is not None else "1",
            version=served,
            orphans=any(getattr(r, "orphans", False) for r in recorders.values()),
            orphans_paused=False,
        )
    )
    graph = StateGraph(SupervisorState, context_schema=RunContext, input_schema=AgentInput)
    graph.add_node("route", _route_node(ask, prompt, agents, max_handoffs))
    for agent_name, agent in agents.items():
        node = _agent_node(agent_name, agent, policy.budget if policy is not None else None, name)
        graph.add_node(agent_name, node if observer is None else paused(node, observer))
        after = recorded(route_after_agent, observer, agent_name)
        graph.add_conditional_edges(agent_name, after, ["route", END])
    graph.add_edge(START, "route")
    after_route = recorded(route_after_router, observer, "route")
    graph.add_conditional_edges("route", after_route, [*agents, END])
    compiled = graph.compile(checkpointer=checkpointer, store=store, name=name)
    admission = Admission.of(ledger, policy.admission if policy is not None else None)
    audit = AuditLog(ledger) if ledger is not None else None
    leases = ThreadLeases.of(ledger)
    return guarded(
        compiled,
        audit,
        admission,
        version=served,
        recorder=observer,
        thread_leases=leases,
        agents=recorders,
        tools=_tools(agents),
        agent_tools=_agent_tools(agents),
    )


def _tools(agents: Mapping[str, Agent]) -> ToolLookup:
    """The agents' tools by name (the first agent's of a name), as `keel_tools` looks them up.

    Only for a conversation no agent's tools name (`_agent_tools`): one nested deeper than
    this supervisor's agents knows.
    """
    lookups = [t for a in agents.values() if (t := getattr(a, "keel_tools", None)) is not None]

    def tool(name: str) -> RegisteredTool | None:
        return next((e for look in lookups if (e := look(name)) is not None), None)

    return tool


def _agent_tools(agents: Mapping[str, Agent]) -> dict[str, ToolLookup]:
    """Each agent's tools, by its node (and a nested supervisor's agents', by theirs).

    A new message on the supervisor's thread reads with them the arguments of the calls an
    agent stopped mid-step left (`graphs._pending.answers_inside`): with the agent's own tool,
    when two agents have a tool of the same name that reads arguments differently.
    """
    out: dict[str, ToolLookup] = {}
    for name, agent in agents.items():
        if (own := getattr(agent, "keel_tools", None)) is not None:
            out[name] = own
    for agent in agents.values():
        for name, inner in (getattr(agent, "keel_agent_tools", None) or {}).items():
            out.setdefault(name, inner)
    return out


def _version(
    agents: Mapping[str, Agent],
    router: str | BaseChatModel | Router,
    prompt: str,
    policy: Policy | None,
    label: str | None,
) -> AgentVersion:
    """What the supervisor was built from: its router's model, its routing prompt, its agents.

    Its agents stand where an agent's tools do: each by name, with its own version's id (a
    changed agent makes a new supervisor version). A function router has no model name.
    """
    model = router if isinstance(router, str) else None
    if isinstance(router, BaseChatModel):
        model = model_name_of(router)
    return AgentVersion(
        model=model,
        prompt_hash=prompt_hash(prompt),
        tool_versions={n: _version_of(a) for n, a in agents.items()},
        policy=f"{policy.name if policy is not None else 'default'}@"
        f"{policy.version if policy is not None else '1'}",
        label=label,
    )


def _version_of(agent: Agent) -> str:
    served: AgentVersion | None = getattr(agent, "keel_version", None)
    return served.id if served is not None else "none"


def _recorder(agent: Agent) -> Recorder | None:
    found: Recorder | None = getattr(agent, "keel_recorder", None)
    return found


def route_after_router(state: SupervisorState) -> str:
    """After `route`: the chosen agent, or the end."""
    decision = state.get("route")
    return END if decision is None else decision["agent"]


def route_after_agent(state: SupervisorState) -> str:
    """After an agent: back to the router, or the end when the agent was stopped or failed."""
    result = state.get("outcome")
    return "route" if result is not None and result["status"] == "success" else END


def _route_node(
    ask: Router | GuardedModel, prompt: str, agents: Mapping[str, Agent], max_handoffs: int
) -> Any:
    def decided(
        state: SupervisorState,
        got: ModelAnswer | Route,
        spent: Usage | None = None,
        clock: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        if isinstance(got, Route):
            return _after_decision(_check(got, agents), state, max_handoffs)
        update: dict[str, Any] = {"usage": got.usage} if got.usage else {}
        if got.stop is not None:
            if got.error is not None:
                return {**update, **_router_failed(got.error)}
            return {**update, "route": None, "outcome": got.stop}
        parsed = got.output.get("parsed")
        if not isinstance(parsed, Route):
            error = got.output.get("parsing_error") or ValueError("the router gave no route")
            return {**update, **_router_failed(error)}
        decision = _after_decision(_check(parsed, agents), state, max_handoffs)
        over = _handoff_over_budget(ask, decision, add_usage(spent, got.usage), clock)
        return {**update, **(decision if over is None else {"route": None, "outcome": over})}

    def route(
        state: SupervisorState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> Steps[dict[str, Any]]:
        """The router's decision, under `invoke` and `ainvoke` alike (`steps_node`)."""
        messages = state.get("messages") or []
        try:
            if not isinstance(ask, GuardedModel):
                return {**decided(state, ask(messages)), **_run_clock(state)[0]}
            asked = valid_history([SystemMessage(prompt), *messages])
            clock, usage = _run_clock(state)
            started = _started(state, clock)
            got = yield from ask.call(asked, config, context_of(runtime), usage, clock=started)
            return {**decided(state, got, usage, started), **clock}
        except GraphBubbleUp:
            raise
        except Exception as exc:
            return _router_failed(exc)

    return steps_node("route", route)


def _started(state: SupervisorState, clock: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The run clock in force: the one the router just started, else the state's."""
    return clock.get("clock") or state.get("clock")


def _handoff_over_budget(
    ask: GuardedModel | Router,
    decision: Mapping[str, Any],
    spent: Usage,
    clock: Mapping[str, Any] | None,
) -> Outcome | None:
    """`budget_exceeded` when the router's answer spent the run budget and hands off.

    The budget is checked before each routing call; a route whose own call spent it is not
    followed (as an agent's tool calls are not run after a turn that spent it), so no agent
    starts on a spent budget.
    """
    budget = ask.budget if isinstance(ask, GuardedModel) else None
    if budget is None or decision.get("route") is None:
        return None
    verdict = check_budget(budget, spent, started_at=(clock or {}).get("started_at"))
    if verdict.exceeded is None:
        return None
    return outcome.stopped("budget_exceeded", f"{verdict.exceeded}; no agent was handed the task")


def _router_failed(exc: BaseException) -> dict[str, Any]:
    """A router that fails ends the run with an outcome, not an exception."""
    detail = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    return {"route": None, "outcome": outcome.failed(f"the supervisor's router failed: {detail}")}


def _after_decision(decision: Route, state: SupervisorState, max_handoffs: int) -> dict[str, Any]:
    """The state update for the router's decision (pure: shared by both drivers)."""
    messages = state.get("messages") or []
    handoffs = state.get("handoffs") or 0
    last = messages[-1] if messages else None
    if handoffs and not (isinstance(last, AIMessage) and last.name):
        handoffs = 0  # a new user turn on the thread: a new task
    if decision.agent == FINISH:
        return {"route": None, "handoffs": handoffs, "outcome": _finished(decision, state)}
    if handoffs >= max_handoffs:
        detail = f"the supervisor handed off {handoffs} times (max_handoffs={max_handoffs})"
        return {"route": None, "outcome": outcome.stopped("budget_exceeded", detail)}
    return {
        "route": {
            "agent": decision.agent,
            "task": decision.task.strip() or _last_user_text(messages),
        },
        "handoffs": handoffs + 1,
        "outcome": None,
    }


def _agent_node(agent_name: str, agent: Agent, budget: Budget | None, holder: str) -> Any:
    def task_input(state: SupervisorState) -> AgentState:
        decision = state.get("route") or {}
        return {"messages": [HumanMessage(decision.get("task", ""))]}

    def held(state: SupervisorState) -> contextlib.AbstractContextManager[None]:
        """The supervisor's run budget, held before each of the agent's model turns and tools.

        What the supervisor's run spent before the hand-off counts with the agent's spend.
        """
        if budget is None:
            return contextlib.nullcontext()
        clock = state.get("clock")
        spent = run_usage(state.get("usage"), clock)
        started = (clock or {}).get("started_at")
        return holding_outer(OuterBudget(budget, spent, started, f"the supervisor {holder!r}"))

    def invoke(state: SupervisorState, config: RunnableConfig) -> dict[str, Any]:
        with held(state):
            return _result(agent_name, agent.invoke(task_input(state), config))

    async def ainvoke(state: SupervisorState, config: RunnableConfig) -> dict[str, Any]:
        with held(state):
            return _result(agent_name, await agent.ainvoke(task_input(state), config))

    return make_node(agent_name, invoke, ainvoke)


def _result(agent_name: str, final: Mapping[str, Any]) -> dict[str, Any]:
    """The supervisor's update from an agent's final state: its answer, usage and outcome."""
    messages = final.get("messages") or []
    answer = next((m for m in reversed(messages) if isinstance(m, AIMessage) and m.text), None)
    text = answer.text if answer is not None else ""
    usage = cast(Usage, final.get("usage") or {})
    update: dict[str, Any] = {
        "messages": [AIMessage(content=text, name=agent_name)],
        "usage": usage,
        "approvals": final.get("approvals") or {},
        "outcome": final.get("outcome"),
        "route": None,
    }
    return update


def _finished(decision: Route, state: SupervisorState) -> Any:
    result = state.get("outcome")
    if result is not None and result["status"] == "success":
        return result
    return outcome.completed(decision.task or "the supervisor finished without handing off")


def _last_user_text(messages: Sequence[BaseMessage]) -> str:
    start = task_start(messages)
    return messages[start].text if start >= 0 else ""


def _prompt(
    agents: Mapping[str, Agent], descriptions: Mapping[str, str], system_prompt: str | None
) -> str:
    lines = [f"- {n}: {descriptions[n]}" if descriptions.get(n) else f"- {n}" for n in agents]
    prompt = (
        "You are a supervisor. Hand the user's task, or its next part, to one of these agents, "
        f"and answer {FINISH} when their answers cover it:\n" + "\n".join(lines)
    )
    return prompt + "\n\n" + system_prompt if system_prompt else prompt


def _check(decision: Route, agents: Mapping[str, Agent]) -> Route:
    """The router's decision, its agent read as the one name it means, or `UserError`.

    A model's sloppy spelling of a name (`" Billing"`, `"finish"`) is that name when it matches
    exactly one choice once stripped and case-folded; anything else ends the run as `error`.
    """
    choices = [*agents, FINISH]
    if decision.agent in choices:
        return decision
    wanted = decision.agent.strip().casefold()
    meant = [c for c in choices if c.casefold() == wanted]
    if len(meant) == 1:
        return decision.model_copy(update={"agent": meant[0]})
    raise UserError(
        f"The supervisor's router chose {decision.agent!r}; the agents are "
        f"{sorted(agents)} (or {FINISH})."
    )


def _validate(agents: Mapping[str, Agent], router: object, max_handoffs: object) -> None:
    if not isinstance(agents, Mapping) or not agents:
        raise UserError("build_supervisor(agents=...) must map agent names to keel agents.")
    for agent_name, agent in agents.items():
        if (problem := _name_problem(agent_name)) is not None:
            raise UserError(f"Agent name {agent_name!r} {problem}; rename it.")
        if (problem := _agent_problem(agent)) is not None:
            raise UserError(f"build_supervisor(agents=...) maps {agent_name!r} to {problem}.")
    if router is None:
        raise UserError("build_supervisor(router=...) needs a chat model or a function.")
    if not isinstance(max_handoffs, int) or max_handoffs < 1:
        raise UserError(
            f"build_supervisor(max_handoffs=...) must be 1 or more, got {max_handoffs!r}."
        )


def _name_problem(agent_name: object) -> str | None:
    """What is wrong with `agent_name` as an agent's name (its node's name), if anything.

    The router's answer is read stripped and case-folded (`_check`): a name that reads as
    `FINISH` so would take a sloppy `"finish"` meant as the end, and a name with whitespace
    around it would never match a sloppy answer. LangGraph reserves its own names (`__end__`,
    `__input__`, ...) and `:` and `|` (its namespaces).
    """
    if not isinstance(agent_name, str) or not agent_name.strip():
        return "must be a non-empty string"
    if agent_name in (FINISH, "route") or (agent_name[:2] == agent_name[-2:] == "__"):
        return "is reserved"  # the router's answer, its node, or a name of LangGraph's
    if agent_name.strip().casefold() == FINISH.casefold():
        return f"reads as {FINISH} (the router's answer is read case-folded)"
    if agent_name != agent_name.strip():
        return "has whitespace around it (the router's answer is read stripped)"
    if {":", "|"} & set(agent_name):
        return "holds ':' or '|', which LangGraph reserves for its namespaces"
    return None


def _agent_problem(agent: object) -> str | None:
    """What is wrong with `agent` as a supervisor's agent, if anything.

    Compiled with `checkpointer=True` it keeps one conversation across the tasks handed to it
    (the next task is answered from the last one's), and with `False` it keeps none: a resumed
    approval starts it anew, and the approved call never runs while the run says completed.
    A saver of its own is fine (run as the supervisor's node, it is on the supervisor's thread).
    """
    if not isinstance(agent, Runnable):
        return f"{type(agent).__name__}: each agent must be a keel agent (build_agent(...))"
    own = getattr(agent, "checkpointer", None)
    if isinstance(own, bool):
        return (
            f"an agent compiled with checkpointer={own!r}: build it without "
            "one (it runs on the supervisor's thread, build_supervisor(checkpointer=...), each "
            "task on a fresh conversation, and its approvals wait there)"
        )
    return None


def _run_clock(state: SupervisorState) -> tuple[dict[str, Any], Usage]:
    """(`{"clock": ...}` when the router starts a new task, else `{}`; the run's usage so far).

    The router is a task's first model call: it starts the run clock, so the run budget counts
    this run's calls only, not the thread's earlier runs (`keel.state.run_usage`). A function
    router starts it too: the run record counts the run's own usage from it, not the thread's
    last record (which may be a sub-agent's).
    """
    clock = task_clock(state, time.time())
    usage = run_usage(state.get("usage"), clock if clock is not None else state.get("clock"))
    return ({"clock": clock} if clock is not None else {}), usage
