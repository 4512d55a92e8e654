"""Run a suite: build each case's graph, run it to its end, answer approvals, score it.

`arun_suite` is the core (async, `concurrency` runs at once, each case `repeat` times);
`run_suite` is its thin sync entry point. A graph factory is a function `factory(model)` that
returns a compiled LangGraph graph (with a checkpointer, so approvals can pause and resume), named
as `module:function`; the default is keel's demo agent (`keel.evals.builtin:demo_agent`).

Prices (`prices=`, `keel eval --price MODEL=IN,OUT`) reach the graph as `factory(model,
prices=table)`: a factory that builds under a dollar limit takes `prices` and passes it to
`build_agent` / `build_supervisor` (keel's built-in factories do). Without prices a factory is
called as `factory(model)`; with prices, a factory that takes no `prices` is refused before
anything runs (it could not use them, and its runs would fail on the unpriced model).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.prebuilt import ToolNode
from langgraph.types import Command
from langsmith.run_helpers import tracing_context

from keel.db.tables import storable
from keel.errors import UserError
from keel.evals.evaluators import Evaluator, default_evaluators, evaluate
from keel.evals.executions import recording
from keel.evals.results import CaseRun, SuiteResult, ToolStep
from keel.evals.suite import Case, ModelSpec, Suite
from keel.graphs.threads import admitted
from keel.models import model_name_of
from keel.observe.tracing import tracing_enabled
from keel.pricing import PriceTable
from keel.tools.registry import registered
from keel.tools.stubs import isolated, stub_answer, stub_message

__all__ = [
    "DEFAULT_GRAPH",
    "GraphFactory",
    "arun_case",
    "arun_suite",
    "build_graph",
    "check_prices",
    "load_graph",
    "run_suite",
]

GraphFactory = Callable[..., Any]
"""`factory(model)` (or `factory(model, prices=table)`, when given prices) returns a compiled
graph (LangGraph `Pregel`) for one case run."""
DEFAULT_GRAPH = "keel.evals.builtin:demo_agent"
"""keel's demo agent (the demo's tools under its policy), the graph of suites that name none."""
MAX_RESUMES = 20


def load_graph(path: str | GraphFactory) -> GraphFactory:
    """The graph factory named `module:function` (or `factory` itself).

    Raises:
        UserError: the path does not name an importable function.
    """
    if callable(path):
        return path
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UserError(f"--graph must be 'module:function', got {path!r}.")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"Cannot load graph factory {path!r}: {exc}.") from exc
    if not callable(factory):
        raise UserError(f"{path!r} is not a function that builds a graph from a model.")
    return factory  # type: ignore[no-any-return]


def _takes_prices(factory: GraphFactory) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read, so try it
        return True
    return any(p.name == "prices" or p.kind is p.VAR_KEYWORD for p in params)


def check_prices(factories: Sequence[tuple[str, GraphFactory]], prices: PriceTable | None) -> None:
    """Refuse prices for a factory that cannot take them (`factory(model, prices=...)`).

    Raises:
        UserError: prices were given and a factory has no `prices` parameter (nor `**kwargs`).
    """
    if prices is None:
        return
    for name, factory in factories:
        if not _takes_prices(factory):
            raise UserError(
                f"Prices were given (--price), but the graph factory {name!r} takes no `prices` "
                "argument, so its agents could not use them. Add `prices: PriceTable | None = "
                "None` to it and pass it on to build_agent / build_supervisor."
            )


def build_graph(factory: GraphFactory, model: BaseChatModel, prices: PriceTable | None) -> Any:
    """`factory(model)`, or `factory(model, prices=prices)` when prices are given."""
    return factory(model) if prices is None else factory(model, prices=prices)


async def arun_suite(
    suite: Suite,
    graph: str | GraphFactory | None = None,
    *,
    model: str | BaseChatModel | None = None,
    judge: str | BaseChatModel | None = None,
    evaluators: Sequence[Evaluator] | None = None,
    repeat: int = 1,
    concurrency: int = 4,
    on_run: Callable[[CaseRun], None] | None = None,
    prices: PriceTable | None = None,
) -> SuiteResult:
    """Run every case of `suite` `repeat` times, `concurrency` at once, and score each run.

    Args:
        suite: The suite (`load_suite(path)`).
        graph: The graph factory (default: the suite's `graph`, else keel's demo agent); a
            case that names its own `graph` runs on that one.
        model: A model for every case, overriding the cases' and the suite's.
        judge: The rubric judge's model (default: the suite's `judge`).
        evaluators: The evaluators (default: `default_evaluators(judge)`).
        repeat: How many times each case runs.
        concurrency: How many runs at once.
        on_run: Called with each finished run (progress lines).
        prices: Prices over keel's table, passed to every factory as `prices=` (see the
            module); a factory that takes no `prices` is then refused before anything runs.
    """
    _check_counts(repeat=repeat, concurrency=concurrency)
    factory, factories = suite_factories(suite, graph, prices)
    if evaluators is None:
        evaluators = default_evaluators(judge or suite.judge)

    async def one(case: Case, index: int) -> CaseRun:
        built = factories[case.graph] if case.graph is not None else factory
        run = await arun_case(
            case, built, model=_model_for(case, suite, model), repeat=index, prices=prices
        )
        run.scores = await evaluate(run, evaluators)
        if on_run is not None:
            on_run(run)
        return run

    jobs = ((case, i) for case in suite.cases for i in range(repeat))
    with _offline_unless_keyed():
        runs = await _in_order(one, jobs, min(concurrency, len(suite.cases) * repeat))
    return SuiteResult(suite=suite.name, runs=runs, graph=graph_name(suite, graph))


def _check_counts(**counts: object) -> None:
    """Refuse a count (`repeat=`, `concurrency=`) that is not a whole number of 1 or more."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a whole number of 1 or more, got {value!r}.")


async def _in_order(
    one: Callable[[Case, int], Awaitable[CaseRun]],
    jobs: Iterator[tuple[Case, int]],
    workers: int,
) -> list[CaseRun]:
    """`one(case, index)` for every job, `workers` at once, the runs in the jobs' order.

    Each worker takes its next job when it is free, so a run exists only once it starts: with
    `repeat=N` all N runs' coroutines and tasks were built up front (memory in proportion to N
    before the first run ended). If one raises, the others are cancelled and it is re-raised.
    """
    done: dict[int, CaseRun] = {}
    numbered = enumerate(jobs)

    async def worker() -> None:
        for n, (case, index) in numbered:  # a plain generator: no other worker runs mid-`next`
            done[n] = await one(case, index)

    tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:  # a run that raised (or a cancel) stops the other workers too
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [done[n] for n in range(len(done))]


def suite_factories(
    suite: Suite, graph: str | GraphFactory | None, prices: PriceTable | None
) -> tuple[GraphFactory, dict[str, GraphFactory]]:
    """The suite's graph factory and its cases' own (by name), checked before anything runs.

    Raises:
        UserError: a factory cannot be loaded, or cannot take the prices given.
    """
    factory = load_graph(graph or suite.graph or DEFAULT_GRAPH)
    factories = {c.graph: load_graph(c.graph) for c in suite.cases if c.graph is not None}
    check_prices(_used(suite, _label(graph, graph_name(suite, graph)), factory, factories), prices)
    return factory, factories


def graph_name(suite: Suite, graph: str | GraphFactory | None) -> str:
    """The graph's name in the results: `graph` as given, else the suite's, else keel's demo."""
    return graph if isinstance(graph, str) else suite.graph or DEFAULT_GRAPH


def _label(graph: str | GraphFactory | None, name: str) -> str:
    return name if graph is None or isinstance(graph, str) else getattr(graph, "__name__", name)


def _used(
    suite: Suite, name: str, factory: GraphFactory, factories: dict[str, GraphFactory]
) -> list[tuple[str, GraphFactory]]:
    """The factories the suite's cases run on, with their names."""
    used = [(name, factory)] if any(c.graph is None for c in suite.cases) else []
    return used + list(factories.items())


def run_suite(suite: Suite, graph: str | GraphFactory | None = None, **options: Any) -> SuiteResult:
    """Sync entry point of `arun_suite` (not from a running event loop: await `arun_suite`)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(arun_suite(suite, graph, **options))
    raise UserError(
        "run_suite() was called inside a running event loop (Jupyter, async code). "
        "Use `await arun_suite(...)` instead."
    )


@contextmanager
def _offline_unless_keyed() -> Iterator[None]:
    """Without a LangSmith key, trace nothing: not the graphs, not the judge, not openevals.

    With `LANGSMITH_TRACING` on and no key, LangChain's default tracer and langsmith's
    `traceable` (which openevals and agentevals wrap every evaluator in) would still post runs.
    """
    if tracing_enabled():
        yield
        return
    with tracing_context(enabled=False):
        yield


def _model_for(
    case: Case, suite: Suite, override: str | BaseChatModel | None
) -> BaseChatModel | ModelSpec:
    if isinstance(override, BaseChatModel):
        return override
    if override is not None:
        return ModelSpec(name=override)
    spec = case.model or suite.model
    if spec is None:
        raise UserError(
            f"Case {case.id!r} has no model: give it `model:`, give the suite one, or pass --model."
        )
    return spec


async def arun_case(
    case: Case,
    factory: GraphFactory,
    *,
    model: BaseChatModel | ModelSpec,
    repeat: int = 0,
    prices: PriceTable | None = None,
) -> CaseRun:
    """Run one case to its end on a fresh graph; approvals answered as the case says.

    `prices` go to the factory (`factory(model, prices=prices)`). A run that raises is
    recorded (`CaseRun.raised`), never re-raised: the evaluators see it.
    """
    chat_model = model.build() if isinstance(model, ModelSpec) else model
    label = model.label if isinstance(model, ModelSpec) else model_name_of(model)
    run = CaseRun(case=case, repeat=repeat, model=label, prices=prices)
    start = time.perf_counter()
    with recording() as executions:
        try:
            graph = build_graph(factory, chat_model, prices)
            if isolated():  # a shadow run: off production's checkpointer, every call stubbable
                graph = isolated_graph(graph)
            run.tools = tool_names(graph)
            values, run.steps = await _drive(graph, case)
        except Exception as exc:
            run.raised = f"{type(exc).__name__}: {exc}"
            values = {}
    run.latency = time.perf_counter() - start
    run.executions = list(executions)
    run.outcome = dict(values.get("outcome") or {})
    run.messages = list(values.get("messages") or [])
    run.usage = dict(values.get("usage") or {})
    run.trajectory = trajectory_of(run.messages)
    return run


async def _drive(graph: Any, case: Case) -> tuple[dict[str, Any], int]:
    # a case id may hold what no database stores as an id (a lone surrogate): escaped here
    label = storable(case.id)
    config: RunnableConfig = {"configurable": {"thread_id": f"eval-{label}-{uuid.uuid4().hex}"}}
    payload: Any = {"messages": list(case.messages)}
    steps = 0
    for _ in range(MAX_RESUMES):
        async for _update in graph.astream(
            payload, config, context=case.identity, stream_mode="updates"
        ):
            steps += 1
        snapshot = await graph.aget_state(config)
        if not snapshot.interrupts:
            return dict(snapshot.values), steps
        payload = Command(resume=_answer(snapshot.interrupts[0].value, case))
    raise UserError(f"Case {case.id!r} was still asking for approvals after {MAX_RESUMES} answers.")


def _answer(requests: Any, case: Case) -> Any:
    decision = {"type": case.approvals, "reviewer": "keel-eval"}
    if isinstance(requests, list):
        return [dict(decision) for _ in requests]
    return decision


def _graphs(graph: Any) -> Iterator[Any]:
    """`graph` and the graphs that are its nodes (a supervisor's agents), each once."""
    todo, seen = [graph], set()
    while todo:
        g = todo.pop()
        if id(g) in seen:
            continue
        seen.add(id(g))
        yield g
        for node in (getattr(g, "nodes", None) or {}).values():
            bound = getattr(node, "bound", None)
            if hasattr(bound, "nodes") and hasattr(bound, "astream"):
                todo.append(bound)


def _tool_nodes(graph: Any) -> Iterator[ToolNode]:
    for g in _graphs(graph):
        for node in (getattr(g, "nodes", None) or {}).values():
            if isinstance(getattr(node, "bound", None), ToolNode):
                yield node.bound


def tool_names(graph: Any) -> list[str] | None:
    """The names of the tools `graph` can call, or `None` when they cannot be found.

    Found in a keel agent's version (`build_agent`) and in LangGraph `ToolNode`s, in the graph
    and in the graphs that are its nodes (a supervisor's agents).
    """
    versions = [v for g in _graphs(graph) if (v := getattr(g, "keel_version", None)) is not None]
    nodes = list(_tool_nodes(graph))
    if not versions and not nodes:
        return None
    names = {n for v in versions for n in v.tool_versions}
    return sorted(names.union(*(node.tools_by_name for node in nodes)))


def stub_tool_nodes(graph: Any) -> Any:
    """`graph`, its `ToolNode`s made to offer each call to the active tool stub first.

    A `keel.tool` asks the stub itself, and so does keel's `PermissionMiddleware`; a LangChain
    tool in a `ToolNode` (a `create_agent` graph without keel's middleware) is asked by nobody,
    so a replay or shadow run would run it for real. The stub is asked after the node's own
    wrappers (a middleware's permission gate still answers first), and only inside
    `keel.tools.stubbing`: elsewhere the node runs as it did.
    """
    for node in _tool_nodes(graph):
        if getattr(node, "_keel_stubbed", False):
            continue
        inner, ainner = node._wrap_tool_call, node._awrap_tool_call

        def wrap(request: Any, execute: Any, inner: Any = inner) -> Any:
            def run(req: Any) -> Any:
                answered = _stubbed(req)
                return answered if answered is not None else execute(req)

            return run(request) if inner is None else inner(request, run)

        async def awrap(request: Any, execute: Any, ainner: Any = ainner) -> Any:
            async def run(req: Any) -> Any:
                answered = _stubbed(req)
                return answered if answered is not None else await execute(req)

            return await (run(request) if ainner is None else ainner(request, run))

        node._wrap_tool_call = wrap
        if ainner is not None or inner is None:  # a sync wrapper alone serves ainvoke too
            node._awrap_tool_call = awrap
        node._keel_stubbed = True  # type: ignore[attr-defined]
    return graph


def isolated_graph(graph: Any) -> Any:
    """`graph` as a replay or shadow run drives it.

    Its `ToolNode`s offer every call to the stub (`stub_tool_nodes`), its threads live in
    memory, not in the checkpointer it was built on (production's: `keel threads` would list
    every replay), and its runs take no admission slot of the user they replay.
    """
    saver = getattr(graph, "checkpointer", None)
    if (saver is None or isinstance(saver, BaseCheckpointSaver)) and hasattr(graph, "copy"):
        graph = graph.copy(update={"checkpointer": InMemorySaver()})
    if getattr(graph, "keel_admission", None) is not None:
        graph = admitted(graph, None)
    return stub_tool_nodes(graph)


def _stubbed(request: Any) -> ToolMessage | None:
    if request.tool is None:
        return None  # an unknown tool: the node answers it
    answer = stub_answer(registered(request.tool), request.tool_call)
    if answer is None:
        return None
    call = request.tool_call
    return stub_message(answer, call.get("id") or "", call["name"])


def trajectory_of(messages: Sequence[BaseMessage]) -> list[ToolStep]:
    """Every tool call in `messages`, in order, with how it ended (`missing` without a result)."""
    results = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
    steps = []
    for message in messages:
        if not isinstance(message, AIMessage):
            continue
        for call in message.tool_calls:
            result = results.get(call["id"] or "")
            status = "missing"
            if result is not None:
                status = str(result.response_metadata.get("keel_status") or result.status)
            steps.append(ToolStep(call["name"], dict(call["args"]), status))
    return steps
