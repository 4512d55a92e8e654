"""`build_agent`: keel's ready agent graph.

```
START → [plan] → call_model ─┬─ tool calls, allowed → execute_tools → call_model (or plan)
                             ├─ tool calls, need a human → human_review → execute_tools
                             ├─ final answer → [verify] → END (or back to call_model)
                             └─ stopped (limit, check, error) → respond → END
```

A tool step costs two supersteps (call_model, execute_tools), as in a hand-built ReAct loop:
checks run inside the nodes they guard, and routing is by conditional edges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import partial
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import BaseTool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore
from langgraph.types import RetryPolicy

from keel.db.audit import AuditLog
from keel.db.ledger import Ledger
from keel.errors import UserError
from keel.graphs._one_run import ThreadLeases
from keel.graphs.threads import guarded
from keel.guards.admission import Admission
from keel.guards.agent_guards import AgentGuards
from keel.guards.gate import Gate
from keel.guards.model_call import ModelTimeoutPolicy
from keel.guards.policy import Policy
from keel.models import model_name_of
from keel.nodes.call_model import DEFAULT_MODEL_RETRY, BeforeModel, call_model
from keel.nodes.content_guards import input_guard, output_guard, route_after_input_guard
from keel.nodes.execute_tools import execute_tools
from keel.nodes.human_review import human_review
from keel.nodes.plan import needs_replan
from keel.nodes.plan import plan as plan_node
from keel.nodes.respond import respond
from keel.nodes.tool_gate import gate_passes, route_after_gate, tool_gate
from keel.nodes.verify import Check
from keel.nodes.verify import verify as verify_node
from keel.observe.observer import (
    Observer,
    Route,
    audited,
    budget_records,
    content_records,
    paused,
    recorded,
    review_records,
    tool_records,
    with_runtime,
)
from keel.observe.tracing import graph_config
from keel.pricing import PriceTable
from keel.state import AgentInput, AgentState, RunContext
from keel.tools.registry import ToolRegistry
from keel.versions import AgentVersion, prompt_hash

__all__ = ["build_agent", "route_after_model", "route_after_review", "route_after_tools"]

Agent = CompiledStateGraph[AgentState, RunContext, AgentInput, AgentState]

# LangGraph raises GraphRecursionError when a node would run with 0 steps remaining. A route
# back to the model needs room for call_model, tool_gate, execute_tools, respond (and
# output_guard); with fewer steps left it goes to respond, which ends the run as
# budget_exceeded (step limit). `build_agent` passes the margin its graph needs.
_STEPS_TO_GO_ON = 3


def _out_of_steps(state: AgentState, steps: int = _STEPS_TO_GO_ON) -> bool:
    remaining = state.get("remaining_steps")
    return remaining is not None and remaining <= steps


def route_after_model(state: AgentState, *, verify: bool = False, gated: bool = False) -> str:
    """After `call_model`: to the tools, a human, verification, `respond`, or the end.

    With `gated`, tool calls go to `tool_gate` (which routes them) instead of `execute_tools`.
    """
    result = state.get("outcome")
    if result is not None:
        if result["status"] == "interrupted":
            return "human_review"
        if result["status"] in ("stopped", "error"):
            messages = state.get("messages") or []
            wrapped_up = bool(messages) and isinstance(messages[-1], AIMessage)
            wrapped_up = wrapped_up and not getattr(messages[-1], "tool_calls", None)
            if result["terminated_reason"] in ("loop_detected", "blocked") and wrapped_up:
                return END  # answered: the loop guard's wrap-up turn, or the withheld answer
            return "respond"
        return "verify" if verify else END
    return "tool_gate" if gated else "execute_tools"


def route_after_tools(
    state: AgentState, *, replan: bool = False, steps: int = _STEPS_TO_GO_ON
) -> str:
    """After `execute_tools`: to the model, `plan`, `respond`, or `human_review`.

    `human_review` when a side-effecting call's outcome is unknown ("did this happen?");
    `respond` when the run is stopped, out of steps, or failed (the ledger failed around a
    side-effecting call).
    """
    result = state.get("outcome")
    if result is not None and result["status"] == "interrupted":
        return "human_review"
    ended = result is not None and result["status"] in ("stopped", "error")
    if _out_of_steps(state, steps) or ended:
        return "respond"
    if replan and needs_replan(state.get("plan") or []):
        return "plan"
    return "call_model"


def route_after_plan(state: AgentState, *, steps: int = 2) -> str:
    """After `plan`: to the model, or to `respond` (no room left, or the planner stopped).

    The planner stops the run when a budget refuses its call or the ledger fails.
    """
    remaining = state.get("remaining_steps")
    result = state.get("outcome")
    stopped = result is not None and result["status"] in ("stopped", "error")
    return "respond" if stopped or (remaining is not None and remaining <= steps) else "call_model"


def route_after_review(state: AgentState, *, steps: int = _STEPS_TO_GO_ON) -> str:
    """After `human_review`: run the approved calls, or `respond` when the run ended.

    It ended when a call was rejected (`stopped`), or when the node failed (`error`: the
    ledger failed while the reviewer's text was screened); the approved calls then do not run.
    """
    result = state.get("outcome")
    ended = result is not None and result["status"] in ("stopped", "error")
    if ended or _out_of_steps(state, steps):
        return "respond"
    return "execute_tools"


def route_after_verify(state: AgentState, *, steps: int = _STEPS_TO_GO_ON) -> str:
    """After `verify`: done, revise, ask a human (`verify` again), or end with the failure."""
    result = state.get("outcome")
    if result is None:
        return "respond" if _out_of_steps(state, steps) else "call_model"
    if result["status"] == "interrupted":
        return "verify"  # escalated: its next step asks the human (see `keel.nodes.verify`)
    return END if result["status"] == "success" else "respond"


def build_agent(
    model: str | BaseChatModel,
    tools: Sequence[BaseTool | Callable[..., Any]] | ToolRegistry = (),
    *,
    system_prompt: str | None = None,
    plan: bool = False,
    verify: bool = False,
    checks: Sequence[Check] = (),
    judge: str | BaseChatModel | None = None,
    max_revisions: int = 1,
    escalate: bool = False,
    policy: Policy | None = None,
    ledger: Ledger | None = None,
    fallback_models: Sequence[str | BaseChatModel] = (),
    downgrade_model: str | BaseChatModel | None = None,
    gate: Gate | None = None,
    before_model: Sequence[BeforeModel] = (),
    prices: PriceTable | None = None,
    model_retry: RetryPolicy = DEFAULT_MODEL_RETRY,
    model_timeout: float | timedelta | ModelTimeoutPolicy | None = None,
    policy_version: str = "1",
    checkpointer: BaseCheckpointSaver[Any] | bool | None = None,
    store: BaseStore | None = None,
    memory: bool = False,
    approval_secret: str | bytes | None = None,
    name: str = "keel_agent",
    version: str | None = None,
) -> Agent:
    """Build keel's agent: plan → call_model ⇄ execute_tools → verify, with human review.

    Every run ends with `outcome = {status, terminated_reason, detail}` in its final state; a
    run that needs a human pauses with `outcome.status == "interrupted"` and resumes with
    `Command(resume=...)` (see `keel.nodes.human_review`).

    Args:
        model: A chat model or a `provider:name` string (`"openai:gpt-4o-mini"`).
        tools: keel tools, LangChain tools or plain functions, or a `ToolRegistry`. A tool may
            take what LangGraph's `ToolNode` injects (`InjectedState`, `InjectedStore`,
            `ToolRuntime`, `InjectedToolCallId`): keel fills it, never the model (see
            `keel.nodes.execute_tools`).
        system_prompt: The system prompt of every model call.
        plan: Plan first (structured output) and replan when a step fails.
        verify: Verify the final answer with `checks` and/or `judge`.
        checks: Rule checks for `verify` (each returns a failure reason or None).
        judge: A model that judges the final answer (implies `verify`).
        max_revisions: How often a failed answer goes back to the model.
        escalate: When the revisions are used up, ask a human (approve / reject / respond)
            instead of ending the run as `verification_failed`.
        policy: The `Policy` the agent is held to: its rules become the permission gate
            (default deny), its budget and loop guard apply, and its name and version are bound
            into approval digests.
        ledger: keel's ledger (`keel.Ledger(url)`), needed by a policy with period budgets,
            rate limits or circuit breakers (their state is shared through it), and by
            user-scoped standing approvals. It also makes side effects happen at most once:
            a side-effecting tool call is recorded before it runs and its result after, so a
            resume, retry or replay gets the recorded result, and a call cut off by a crash
            goes to `human_review` ("did this happen?") unless the tool is `idempotent` or
            has `reconcile`. Without a ledger a crash between a tool's effect and the next
            checkpoint repeats the effect on resume. keel does not derive a ledger from the
            checkpointer: pass the same URL to both (`Ledger(url)`, `Persistence(url)`). With
            a ledger, the agent also writes the audit log and a run record per run to it.
        fallback_models: Models to try, in order, when `model` is down (5xx, connection
            errors, still rate limited after retries, open breaker); see
            `keel.guards.fallback`.
        downgrade_model: A cheaper model used instead of `model` once the policy's run budget
            is past its soft threshold (model tiering); off by default. Needs a budget.
        gate: Decides allow / ask / deny per tool call. Default: the policy's permission
            matrix with a policy, else ask for tools that require approval and allow the rest.
        before_model: Checks run inside `call_model` before each model call.
        prices: The price table for USD accounting.
        model_retry: LangGraph `RetryPolicy` for transient model errors.
        model_timeout: A deadline for each attempt of every model call, in seconds or a
            `ModelTimeoutPolicy` (`fallback=True` moves to the next of `fallback_models` on
            a timeout). Without it keel waits as long as the provider's client does.
        policy_version: Bound into approval digests.
        checkpointer: A LangGraph checkpointer (see `keel.Persistence`); needed for approvals.
        store: A LangGraph store for long-term memory (e.g. `keel.memory.ChromaStore`); under
            LangGraph server, leave it out and the server's store is used.
        memory: Wire long-term memory in: `recall` puts the user's relevant memories and
            lessons into the context before the run, `reflect` stores a lesson of the run when
            it ends (not while it waits for a human). Needs a store (`store=` or the graph's)
            and the run's identity (`RunContext`). Add `keel.memory.memory_tools()` to `tools`
            to let the model remember and forget on its own.
        approval_secret: The server-side secret approval grants are sealed with (HMAC), so a
            client cannot forge or replay one (`keel.approvals.Grants`). Default: the
            `KEEL_APPROVAL_SECRET` environment variable, else a random secret of this process
            (grants then do not outlive it: after a restart keel asks again). Set it to keep
            grants across restarts and processes; never send it to a client.
        name: The graph's name (shown in traces and the server).
        version: Your label for this version of the agent (`"v2"`). Run records, audit
            records and trace metadata name the version that served each run: this label (or
            an `auto-<digest>` id), the model, a hash of the system prompt, the tool versions
            and the policy version (`keel.versions.AgentVersion`; `keel report --by version`).

    Example:
        ```python
        from keel import RunContext
        from keel.evals import ScriptedChatModel
        from keel.graphs import build_agent

        agent = build_agent(ScriptedChatModel(script=["Hello!"]))
        result = agent.invoke({"messages": [("user", "hi")]}, context=RunContext(user_id="u1"))
        assert result["outcome"]["terminated_reason"] == "completed"
        ```
    """
    _validate(
        system_prompt=system_prompt,
        before_model=before_model,
        checks=checks,
        max_revisions=max_revisions,
        checkpointer=checkpointer,
        tools=tools,
        memory=memory,
        store=store,
        name=name,
    )
    _validate_models(model, fallback_models, downgrade_model, policy)
    registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
    _refuse_injected(registry)
    # every model call (agent, planner, judge) is reserved, limited, counted and falls back;
    # building the guards also checks the types of `policy`, `ledger`, `gate`, `prices` ...
    guards = AgentGuards.from_policy(
        policy,
        ledger,
        prices=prices,
        gate=gate,
        retry=model_retry,
        timeout=model_timeout,
        approval_secret=approval_secret,
        policy_version=policy_version,
        tools=registry.names,
    )
    served = AgentVersion(
        model=model if isinstance(model, str) else model_name_of(model),
        prompt_hash=prompt_hash(system_prompt),
        tool_versions={t.name: t.spec.version for t in registry},
        policy=guards.policy_label,
        label=version,
    )
    observer = (
        Observer(
            guards.ledger,
            graph=name,
            policy_name=guards.policy_name,
            policy_version=guards.policy_version,
            version=served,
            orphans=any(t.spec.side_effects for t in registry),
        )
        if guards.ledger is not None
        else None
    )
    wiring = _Wiring(
        StateGraph(AgentState, context_schema=RunContext, input_schema=AgentInput),
        guards,
        registry,
        observer,
    )
    wiring.agent_loop(model, system_prompt, before_model, fallback_models, downgrade_model)
    first = wiring.entry(plan=plan, memory=memory, store=store)
    if plan:
        wiring.planner(model, fallback_models, system_prompt)
    if verify or judge is not None or bool(checks):
        wiring.verifier(checks, judge, max_revisions, escalate)
    wiring.routes(first, plan=plan)
    compiled = wiring.graph.compile(checkpointer=checkpointer, store=store, name=name)
    admission = Admission.of(ledger, policy.admission if policy is not None else None)
    audit = AuditLog(ledger) if ledger else None
    agent: Agent = guarded(
        compiled, audit, admission, output_guard=guards.output_guard, version=served,
        recorder=observer, thread_leases=ThreadLeases.of(ledger), tools=registry.get,
    )  # fmt: skip
    traced = graph_config(graph=name, policy=served.policy, version=served)
    return agent if traced is None else agent.with_config(traced)


class _Wiring:
    """The nodes and edges of `build_agent`'s graph around one `AgentGuards`."""

    def __init__(
        self,
        graph: StateGraph[AgentState, RunContext, AgentInput, AgentState],
        guards: AgentGuards,
        registry: ToolRegistry,
        observer: Observer | None,
    ) -> None:
        self.graph, self.guards, self.registry, self.observer = graph, guards, registry, observer
        self.gated = guards.gated
        # steps a route back to the model needs (see _STEPS_TO_GO_ON): one more with output_guard
        self.reserve = 3 + (guards.output_guard is not None)
        self.steps = self.reserve + 1
        self.end: str = END
        self.finish: str = END
        self.after_model = ["execute_tools", "human_review"] + (["tool_gate"] if self.gated else [])
        self.after_tools = ["call_model", "respond", "human_review"]
        self.verify = False

    def observed(self, node: Any, derive: Any) -> Any:
        return node if self.observer is None else audited(node, self.observer, derive)

    def agent_loop(
        self,
        model: str | BaseChatModel,
        system_prompt: str | None,
        before_model: Sequence[BeforeModel],
        fallbacks: Sequence[str | BaseChatModel],
        downgrade: str | BaseChatModel | None,
    ) -> None:
        """call_model, [tool_gate], execute_tools, human_review and respond."""
        graph, guards, registry = self.graph, self.guards, self.registry
        node = call_model(
            model,
            registry,
            system_prompt=system_prompt,
            before_model=before_model,
            guards=guards,
            fallbacks=fallbacks,
            downgrade=downgrade,
            reserve_steps=self.reserve,
        )
        graph.add_node("call_model", self.observed(node, budget_records))
        records = tool_records(registry, guards.gate)
        if self.gated:
            graph.add_node("tool_gate", self.observed(tool_gate(registry, guards=guards), records))
        node = execute_tools(registry, guards=guards)
        graph.add_node("execute_tools", self.observed(node, records))
        node = human_review(registry, guards=guards)
        graph.add_node("human_review", self.observed(node, review_records(registry)))
        graph.add_node("respond", respond(output_guard=guards.output_guard))

    def entry(self, *, plan: bool, memory: bool, store: BaseStore | None) -> str:
        """[input_guard] → [recall] → [plan] on the way in; [output_guard] → [reflect] out."""
        graph, observer, guards = self.graph, self.observer, self.guards
        # With memory, every run that ends goes through `reflect` on its way out.
        self.end = end = self.memory(store) if memory else END
        # A finished run goes through `output_guard` (when there is one) and then to `end`.
        outputs = guards.output_guard
        self.finish = "output_guard" if outputs is not None else end
        first = "plan" if plan else "call_model"
        if memory:
            graph.add_edge("recall", first)
            first = "recall"
        if guards.input_guard is not None:
            after_input = partial(route_after_input_guard, next=first)
            node = input_guard(guards.input_guard, guards=guards.model)
            graph.add_node("input_guard", self.observed(node, content_records))
            route = recorded(after_input, observer, "input_guard")
            graph.add_conditional_edges("input_guard", route, [first, "respond"])
            first = "input_guard"
        if outputs is not None:
            node = output_guard(outputs)
            graph.add_node("output_guard", self.observed(node, content_records))
            route = recorded(lambda s: END, observer, "output_guard", end=end)
            graph.add_conditional_edges("output_guard", route, [end])
        return first

    def memory(self, store: BaseStore | None) -> str:
        """`recall` (the caller adds its edge from START) and `reflect` → END; returns `reflect`.

        `recall` screens memories with the policy's input guard: they join the system prompt.
        """
        from keel.memory.nodes import recall, reflect  # imports chromadb: only when memory is on

        node = recall(store, guard=self.guards.input_guard, guards=self.guards.model)
        self.graph.add_node("recall", self.observed(node, content_records))
        self.graph.add_node("reflect", reflect(store))
        self.graph.add_edge("reflect", END)
        return "reflect"

    def planner(
        self,
        model: str | BaseChatModel,
        fallbacks: Sequence[str | BaseChatModel],
        system_prompt: str | None,
    ) -> None:
        steps = self.reserve - 1
        node = plan_node(
            model,
            fallbacks=fallbacks,
            guards=self.guards,
            tools=self.registry.tools,
            system_prompt=system_prompt,
        )
        self.graph.add_node("plan", node)
        route = recorded(lambda s: route_after_plan(s, steps=steps), self.observer, "plan")
        self.graph.add_conditional_edges("plan", route, ["call_model", "respond"])
        self.after_tools.append("plan")

    def verifier(
        self,
        checks: Sequence[Check],
        judge: str | BaseChatModel | None,
        revisions: int,
        escalate: bool,
    ) -> None:
        node = verify_node(
            checks=checks,
            judge=judge,
            max_revisions=revisions,
            escalate=escalate,
            guards=self.guards,
        )
        self.graph.add_node(
            "verify", node if self.observer is None else paused(node, self.observer)
        )
        steps = self.steps
        route = self._to(lambda s: route_after_verify(s, steps=steps), "verify")
        to = ["call_model", "respond", "verify", self.finish]
        self.graph.add_conditional_edges("verify", route, to)
        self.verify = True

    def routes(self, first: str, *, plan: bool) -> None:
        """The conditional edges of the agent loop."""
        graph, observer, steps = self.graph, self.observer, self.steps
        verify, gated = self.verify, self.gated
        graph.add_edge(START, first)
        after_model = [*self.after_model, "respond", self.finish] + (["verify"] if verify else [])
        passes = gate_passes(self.registry, self.guards) if gated else None

        def after_call(state: AgentState, runtime: Runtime[RunContext] | None) -> str:
            choice = route_after_model(state, verify=verify, gated=gated)
            # calls the gate lets through untouched skip its node (execute_tools gates again);
            # after a state update (no runtime: no user to check) they never do
            skip = (
                choice == "tool_gate"
                and passes is not None
                and runtime is not None
                and passes(state, runtime)
            )
            return "execute_tools" if skip else choice

        to_tools = self._to(after_call, "call_model")
        graph.add_conditional_edges("call_model", to_tools, after_model)
        if gated:
            to = ["execute_tools", "human_review", "respond", "call_model"]
            graph.add_conditional_edges(
                "tool_gate", recorded(route_after_gate, observer, "tool_gate"), to
            )
        after_tools = recorded(
            lambda s: route_after_tools(s, replan=plan, steps=steps), observer, "execute_tools"
        )
        graph.add_conditional_edges("execute_tools", after_tools, self.after_tools)
        after_review = recorded(
            lambda s: route_after_review(s, steps=steps), observer, "human_review"
        )
        graph.add_conditional_edges("human_review", after_review, ["execute_tools", "respond"])
        graph.add_conditional_edges("respond", self._to(lambda s: END, "respond"), [self.finish])

    def _to(self, route: Route, source: str) -> Any:
        return _to(route, self.observer, source, self.finish, self.end)


def _refuse_injected(registry: ToolRegistry) -> None:
    """Refuse a tool that needs an injected argument keel's agent cannot fill.

    keel fills what LangGraph's `ToolNode` fills: `InjectedState` (the whole state, or a field
    of `AgentState`), `InjectedStore`, `ToolRuntime`, and LangChain fills `InjectedToolCallId`.
    A required argument of another `InjectedToolArg`, or `InjectedState` of a field
    `AgentState` does not have, would fail every call of the tool.
    """
    fields = set(AgentState.__annotations__)
    for entry in registry:
        found = entry.injected
        if found.unfilled:
            raise UserError(
                f"Tool {entry.name!r} takes {', '.join(repr(n) for n in found.unfilled)}, an "
                "injected argument keel's agent does not fill: it fills InjectedState, "
                "InjectedStore, ToolRuntime and InjectedToolCallId. Use one of those (e.g. "
                "runtime: ToolRuntime, for the config and context), or give the argument a "
                "default."
            )
        unknown = {
            f
            for p, f in found.state.items()
            if f is not None and f not in fields and p not in found.optional
        }
        if unknown:
            raise UserError(
                f"Tool {entry.name!r} takes InjectedState of "
                f"{', '.join(sorted(map(repr, unknown)))}, which keel's AgentState does not "
                f"have; it has {', '.join(sorted(fields))}. "
                "Take one of those (e.g. InjectedState('messages')), or the whole state "
                "(InjectedState())."
            )


def _validate_models(
    model: object, fallback_models: object, downgrade_model: object, policy: Policy | None
) -> None:
    if not isinstance(model, str | BaseChatModel):
        raise UserError(
            "build_agent(model=...) must be a chat model or a 'provider:name' string (e.g. "
            f"'openai:gpt-4o-mini'), got {model!r}."
        )
    if isinstance(fallback_models, str | BaseChatModel) or not all(
        isinstance(m, str | BaseChatModel)
        for m in (fallback_models if isinstance(fallback_models, Sequence) else [None])
    ):
        raise UserError(
            "build_agent(fallback_models=...) must be a list of chat models or 'provider:name' "
            f"strings, got {fallback_models!r}."
        )
    if downgrade_model is not None and (
        not isinstance(downgrade_model, str | BaseChatModel)
        or not isinstance(policy, Policy)
        or not policy.budget
    ):
        raise UserError(
            "build_agent(downgrade_model=...) switches to a cheaper model near the run budget's "
            "limit: pass a chat model or 'provider:name' string, and a policy with a budget "
            "(Policy(budget=Budget(usd=..., soft_ratio=0.8)))."
        )


def _to(
    route: Route,
    observer: Observer | None,
    source: str,
    finish: str,
    end: str,
) -> Any:
    """`route` recorded; a route to END goes to `finish`: `output_guard`, or `end` without one.

    The run record is written where the run really ends (after `output_guard`), so it holds
    what the output guard found.
    """
    if finish == end:
        return recorded(route, observer, source, end=end)

    choose = with_runtime(route)

    def to_finish(state: AgentState, runtime: Runtime[RunContext] | None) -> str:
        choice = choose(state, runtime)
        return finish if choice == END else choice

    return recorded(to_finish, observer, source)


def _validate(
    *,
    system_prompt: object,
    before_model: Sequence[object],
    checks: Sequence[object],
    max_revisions: object,
    checkpointer: object,
    tools: object,
    memory: object,
    store: object,
    name: object,
) -> None:
    """Reject bad arguments with a message that names the argument and the fix."""
    if store is not None and not isinstance(store, BaseStore):
        raise UserError(
            f"build_agent(store=...) must be a LangGraph store (e.g. keel.memory.ChromaStore"
            f"(...) or InMemoryStore()), got {type(store).__name__}."
        )
    if not isinstance(name, str) or not name:
        raise UserError(f"build_agent(name=...) must be a non-empty string, got {name!r}.")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise UserError(
            f"build_agent(system_prompt=...) must be a string or None, got "
            f"{type(system_prompt).__name__}."
        )
    for name, items in (("before_model", before_model), ("checks", checks)):
        if isinstance(items, str | bytes) or not all(callable(i) for i in items):
            raise UserError(f"build_agent({name}=...) must be a list of functions, got {items!r}.")
    if not isinstance(memory, bool):
        raise UserError(
            f"build_agent(memory=...) must be True or False (pass the store as store=...), "
            f"got {memory!r}."
        )
    if not isinstance(max_revisions, int) or max_revisions < 0:
        raise UserError(f"build_agent(max_revisions=...) must be 0 or more, got {max_revisions!r}.")
    if checkpointer is not None and not isinstance(checkpointer, bool | BaseCheckpointSaver):
        raise UserError(
            f"build_agent(checkpointer=...) must be a LangGraph checkpointer (e.g. from "
            f"keel.Persistence(url).checkpointer()), got {type(checkpointer).__name__}."
        )
    if isinstance(tools, str | bytes) or not isinstance(tools, ToolRegistry | Sequence):
        raise UserError(
            f"build_agent(tools=...) must be a list of tools or a ToolRegistry, got {tools!r}."
        )
