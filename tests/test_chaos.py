"""`ChaosChatModel`: each fault on its own, determinism, and keel's agent under chaos."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    InvalidToolCall,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import RetryPolicy

from keel import Persistence, build_agent
from keel.errors import ModelRequestsForbidden, UserError
from keel.evals import (
    ChaosChatModel,
    ChaosPolicy,
    ChaosRateLimitError,
    ChaosServerError,
    ScriptedChatModel,
    call,
)
from keel.evals.chaos import ChaosFault
from keel.evals.scripted import malformed
from keel.nodes import valid_history
from keel.tools import tool

QUESTION = [HumanMessage(content="where is A1?")]


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order by id."""
    return f"order {order_id}: shipped"


@tool
def track_parcel(order_id: str) -> str:
    """Track the parcel of an order."""
    return f"parcel of {order_id}: in transit"


def support_turn(messages: Sequence[BaseMessage]) -> AIMessage | str:
    """Look up, then track, then answer; whatever happened in between (errors are retried)."""
    done = [m for m in messages if isinstance(m, ToolMessage) and m.status == "success"]
    if not done:
        return call("lookup_order", order_id="A1")
    if len(done) == 1:
        return call("track_parcel", order_id="A1")
    return "Order A1 shipped and is in transit."


def chaos(
    policy: ChaosPolicy, script: Sequence[Any] = (support_turn,) * 60, *, fresh_ids: bool = True
) -> ChaosChatModel:
    inner = ScriptedChatModel(script=list(script), fresh_ids=fresh_ids)
    return ChaosChatModel(model=inner, policy=policy)


# -- the policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": 1.5}, "ChaosPolicy.timeout must be between 0 and 1, got 1.5."),
        ({"rate_limit": -0.1}, "ChaosPolicy.rate_limit must be between 0 and 1, got -0.1."),
        ({"server_error": "0.1"}, "ChaosPolicy.server_error must be between 0 and 1, got '0.1'."),
        (
            {"timeout": 0.6, "unknown_tool": 0.6},
            "ChaosPolicy rates add up to 1.2; at most one fault is injected per call, so they "
            "must add up to at most 1.",
        ),
        ({"seed": 1.5}, "ChaosPolicy.seed must be an int, got 1.5."),
        ({"retry_after": -1}, "ChaosPolicy.retry_after must be 0 or more (seconds), got -1."),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as err:
        ChaosPolicy(**kwargs)
    assert str(err.value) == message


def test_uniform_splits_the_rate_evenly() -> None:
    policy = ChaosPolicy.uniform(0.3, seed=4)
    assert policy.total == pytest.approx(0.3)
    assert policy.rate_limit == pytest.approx(0.05) and policy.seed == 4
    with pytest.raises(
        UserError, match=r"^ChaosPolicy.uniform\(rate=...\) must be between 0 and 1"
    ):
        ChaosPolicy.uniform(2)


# -- each fault --------------------------------------------------------------------------------


def test_rate_limit_looks_like_a_provider_429() -> None:
    model = chaos(ChaosPolicy(rate_limit=1.0, retry_after=2.5))
    with pytest.raises(ChaosRateLimitError) as err:
        model.invoke(QUESTION)
    exc = err.value
    assert (exc.status_code, exc.retry_after, exc.response.status_code) == (429, 2.5, 429)
    assert exc.response.headers["retry-after"] == exc.response.headers["Retry-After"] == "2.5"
    assert str(exc) == "Error code: 429 - rate limit exceeded (injected); retry after 2.5 s"
    assert model.faults == [ChaosFault(0, "rate_limit", "429, retry-after 2.5")]


def test_server_errors_are_500_or_503() -> None:
    model = chaos(ChaosPolicy(server_error=1.0, seed=3))
    codes = []
    for _ in range(20):
        with pytest.raises(ChaosServerError) as err:
            model.invoke(QUESTION)
        assert err.value.response.status_code == err.value.status_code
        codes.append(err.value.status_code)
    assert set(codes) == {500, 503}
    assert str(err.value) in (
        "Error code: 500 - internal server error (injected)",
        "Error code: 503 - service unavailable (injected)",
    )


def test_timeout_raises_and_can_hang_first() -> None:
    with pytest.raises(TimeoutError, match=r"^Request timed out \(injected by ChaosChatModel"):
        chaos(ChaosPolicy(timeout=1.0)).invoke(QUESTION)
    hung = chaos(ChaosPolicy(timeout=1.0, timeout_after=0.05))
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        asyncio.run(hung.ainvoke(QUESTION))
    assert time.perf_counter() - start >= 0.05


def test_malformed_tool_call_is_an_invalid_tool_call() -> None:
    model = chaos(ChaosPolicy(malformed_tool_call=1.0), fresh_ids=False)  # asserts the id kept
    answer = model.bind_tools([lookup_order, track_parcel]).invoke(QUESTION)
    assert isinstance(answer, AIMessage)
    assert answer.tool_calls == []
    (bad,) = answer.invalid_tool_calls
    assert (bad["name"], bad["id"], bad["args"]) == (
        "lookup_order",
        "call_0_0",
        '{"order_id": "A1",}',
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(bad["args"] or "")
    assert model.faults == [ChaosFault(0, "malformed_tool_call", "lookup_order")]


def test_malformed_tool_call_when_streaming_is_parsed_into_invalid_tool_calls() -> None:
    model = chaos(ChaosPolicy(malformed_tool_call=1.0))
    chunks = list(model.bind_tools([lookup_order]).stream(QUESTION))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.tool_calls == []  # type: ignore[attr-defined]
    assert [c["args"] for c in merged.invalid_tool_calls] == ['{"order_id": "A1",}']  # type: ignore[attr-defined]


def test_unknown_tool_is_never_a_bound_tool() -> None:
    model = chaos(ChaosPolicy(unknown_tool=1.0, seed=1))
    bound = model.bind_tools([lookup_order, track_parcel])
    names = set()
    for _ in range(10):
        answer = bound.invoke(QUESTION)
        assert isinstance(answer, AIMessage)
        names.add(answer.tool_calls[0]["name"])
    assert names == {"lookup_order_v2", "track_parcel_v2"}
    assert {f.kind for f in model.faults} == {"unknown_tool"}


def test_repeated_call_repeats_the_previous_turn() -> None:
    model = chaos(ChaosPolicy(repeated_call=1.0), fresh_ids=False)  # asserts the inner id
    history = [
        *QUESTION,
        AIMessage(
            content="",
            tool_calls=[{"name": "lookup_order", "args": {"order_id": "A1"}, "id": "c1"}],
        ),
        ToolMessage(content="order A1: shipped", tool_call_id="c1"),
    ]
    answer = model.invoke(history)
    assert isinstance(answer, AIMessage)
    assert [(c["name"], c["args"], c["id"]) for c in answer.tool_calls] == [
        ("lookup_order", {"order_id": "A1"}, "chaos_0_0")
    ]
    # with no previous tool call there is nothing to repeat: the call goes through
    assert model.invoke(QUESTION).tool_calls[0]["id"] == "call_0_0"  # type: ignore[attr-defined]
    assert [f.kind for f in model.faults] == ["repeated_call"]


def test_a_made_up_call_gets_a_fresh_id_when_the_model_gives_fresh_ids() -> None:
    """A restarted process (a new model) repeating a turn must not reuse the last one's ids."""
    history = [
        *QUESTION,
        AIMessage(
            content="",
            tool_calls=[{"name": "lookup_order", "args": {"order_id": "A1"}, "id": "c1"}],
        ),
        ToolMessage(content="order A1: shipped", tool_call_id="c1"),
    ]
    ids = set()
    for _ in range(2):  # a model per process, each on its first call
        for policy in (ChaosPolicy(repeated_call=1.0), ChaosPolicy(unknown_tool=1.0)):
            answer = chaos(policy).bind_tools([lookup_order]).invoke(history)
            assert isinstance(answer, AIMessage)
            ids.add(answer.tool_calls[0]["id"])
    assert len(ids) == 4 and all(i.startswith("chaos_") for i in ids), ids


LEFT_UNANSWERED = [
    *QUESTION,
    AIMessage(content="", tool_calls=[{"name": "lookup_order", "args": {}, "id": "c1"}]),
    HumanMessage(content="and?"),
]


@pytest.mark.parametrize("fault", ["unknown_tool", "repeated_call", "server_error"])
def test_chaos_refuses_a_malformed_history_before_any_fault(fault: str) -> None:
    """A fault that answers without the wrapped model (or fails) skipped its check: a history
    a provider refuses got a made-up answer. The wrapper refuses it itself, by default, before
    drawing, as a provider's 400 comes before anything else."""
    lenient = ScriptedChatModel(script=[support_turn] * 3, strict_history=False)
    model = ChaosChatModel(model=lenient, policy=ChaosPolicy(**{fault: 1.0}))
    with pytest.raises(ValueError, match=r"Invalid messages.*c1"):
        model.invoke(LEFT_UNANSWERED)
    with pytest.raises(ValueError, match=r"Invalid messages.*c1"):
        list(model.stream(LEFT_UNANSWERED))
    with pytest.raises(ValueError, match=r"Invalid messages.*c1"):
        asyncio.run(model.ainvoke(LEFT_UNANSWERED))
    assert (model.faults, model.calls) == ([], 0)
    off = ChaosChatModel(model=lenient, policy=ChaosPolicy(unknown_tool=1.0), strict_history=False)
    assert isinstance(off.invoke(LEFT_UNANSWERED), AIMessage)  # a test that means to send it


def test_an_invalid_tool_call_is_a_call_its_result_answers() -> None:
    """LangChain sends a call whose arguments did not parse (`invalid_tool_calls`) to OpenAI
    among `tool_calls`: keel's result for it is the answer the provider wants, not a result
    answering no call (the strict check refused keel's answer), and leaving it unanswered is
    refused."""
    bad = InvalidToolCall(type="invalid_tool_call", name="lookup", args="{", id="c1", error=None)
    asked = AIMessage(content="", invalid_tool_calls=[bad])
    answer = ToolMessage(content="Error: not valid JSON", tool_call_id="c1", status="error")
    assert malformed([*QUESTION, asked, answer, HumanMessage(content="and?")]) is None
    assert "c1" in str(malformed([*QUESTION, asked, HumanMessage(content="and?")]))
    model = chaos(ChaosPolicy(malformed_tool_call=1.0), script=[support_turn] * 3)
    agent = build_agent(model, [lookup_order, track_parcel])
    done = agent.invoke({"messages": [("user", "Where is order A1?")]})
    assert done["outcome"]["detail"].startswith("model call failed after 3"), done["outcome"]
    assert "ModelBehaviorError" in done["outcome"]["detail"]  # three broken turns, each answered
    assert provider_valid(done["messages"])


def test_no_fault_passes_through_invoke_ainvoke_and_stream() -> None:
    model = chaos(ChaosPolicy(), script=["It shipped today."])
    assert model.invoke(QUESTION).content == "It shipped today."
    assert asyncio.run(model.ainvoke(QUESTION)).content == "It shipped today."
    assert "".join(str(c.content) for c in model.stream(QUESTION)) == "It shipped today."
    assert model.faults == [] and model.calls == 3
    assert model.model_name == "scripted"


# -- determinism and threads -------------------------------------------------------------------


def _kinds(seed: int, n: int = 60) -> list[str | None]:
    model = chaos(ChaosPolicy(timeout=0.1, rate_limit=0.1, server_error=0.1, seed=seed))
    out: list[str | None] = []
    for _ in range(n):
        try:
            model.invoke(QUESTION)
            out.append(None)
        except (TimeoutError, ChaosRateLimitError, ChaosServerError) as exc:
            out.append(type(exc).__name__)
    return out


def test_same_seed_same_faults() -> None:
    assert _kinds(7) == _kinds(7)
    assert _kinds(7) != _kinds(8)
    assert 8 < sum(k is not None for k in _kinds(7)) < 32  # ~30% of 60


def test_threads_share_one_instance_safely() -> None:
    policy = ChaosPolicy(timeout=0.1, rate_limit=0.1, unknown_tool=0.1, seed=11)
    shared = chaos(policy)
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(25):
            try:
                shared.invoke(QUESTION)
            except (TimeoutError, ChaosRateLimitError):
                pass
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and shared.calls == 200
    alone = chaos(policy)
    for _ in range(200):
        with contextlib.suppress(TimeoutError, ChaosRateLimitError):
            alone.invoke(QUESTION)
    # the same draws, in a different interleaving: the same faults on the same call indexes
    assert sorted(shared.faults, key=lambda f: f.call) == alone.faults


class _RealModel(BaseChatModel):
    """Stands in for a provider model: not a keel test double."""

    @property
    def _llm_type(self) -> str:
        return "real"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="paid call"))])


def test_wrapping_a_real_model_is_still_forbidden_in_tests() -> None:
    with pytest.raises(ModelRequestsForbidden):
        ChaosChatModel(model=_RealModel()).invoke(QUESTION)


# -- keel's agent under chaos ------------------------------------------------------------------

FAST_RETRY = RetryPolicy(initial_interval=0.001, max_interval=0.002, jitter=False, max_attempts=3)


def provider_valid(messages: list[BaseMessage]) -> bool:
    """Valid for OpenAI and Anthropic: keel's repair changes nothing, and the scripted model's
    check (which counts `invalid_tool_calls` as calls, as LangChain sends them) finds nothing."""
    return valid_history(messages) == messages and malformed(messages) is None


async def _chaos_runs(policy_of: Any, runs: int) -> list[tuple[dict[str, Any], ChaosChatModel]]:
    async def one(seed: int) -> tuple[dict[str, Any], ChaosChatModel]:
        model = chaos(policy_of(seed))
        agent = build_agent(
            model,
            [lookup_order, track_parcel],
            checkpointer=InMemorySaver(),
            model_retry=FAST_RETRY,
        )
        config = {"configurable": {"thread_id": f"chaos-{seed}"}, "recursion_limit": 40}
        result = await agent.ainvoke({"messages": [("user", "Where is order A1?")]}, config)
        return result, model

    return await asyncio.gather(*(one(seed) for seed in range(runs)))


def _assert_every_run_ends_well(results: list[tuple[dict[str, Any], ChaosChatModel]]) -> None:
    for result, model in results:
        where = f"seed {model.policy.seed}, faults {model.faults}"
        assert result.get("outcome") is not None, where
        assert result["outcome"]["status"] in ("success", "stopped", "error"), where
        # an error, but never the provider's 400 for a history keel sent malformed
        assert "Invalid messages" not in str(result["outcome"]["detail"]), where
        assert provider_valid(result["messages"]), where
        last = result["messages"][-1]
        assert isinstance(last, AIMessage) and last.text, f"no final answer: {where}"


async def test_agent_survives_errors_unknown_tools_and_loops() -> None:
    results = await _chaos_runs(_no_malformed, runs=40)
    _assert_every_run_ends_well(results)
    kinds = Counter(f.kind for _, model in results for f in model.faults)
    assert set(kinds) == {"timeout", "rate_limit", "server_error", "unknown_tool", "repeated_call"}
    reasons = Counter(result["outcome"]["terminated_reason"] for result, _ in results)
    assert reasons["completed"] >= 25, reasons


async def test_agent_under_30_percent_of_all_faults() -> None:
    results = await _chaos_runs(lambda seed: ChaosPolicy.uniform(0.3, seed=seed), runs=40)
    _assert_every_run_ends_well(results)


async def test_a_model_timeout_ends_the_run_as_timeout() -> None:
    ((result, _),) = await _chaos_runs(lambda seed: ChaosPolicy(timeout=1.0, seed=seed), runs=1)
    assert result["outcome"]["terminated_reason"] == "timeout"


def _no_malformed(seed: int) -> ChaosPolicy:
    rate = 0.3 / 5
    return ChaosPolicy(
        timeout=rate,
        rate_limit=rate,
        server_error=rate,
        unknown_tool=rate,
        repeated_call=rate,
        seed=seed,
    )


async def test_agent_streams_tokens_under_chaos() -> None:
    # stream_mode="messages" makes LangGraph call the model's astream: chaos's streaming driver
    injected = 0
    for seed in range(10):
        model = chaos(_no_malformed(100 + seed))
        agent = build_agent(
            model,
            [lookup_order, track_parcel],
            checkpointer=InMemorySaver(),
            model_retry=FAST_RETRY,
        )
        config = {"configurable": {"thread_id": f"stream-{seed}"}, "recursion_limit": 40}
        final: dict[str, Any] = {}
        async for mode, payload in agent.astream(
            {"messages": [("user", "Where is order A1?")]},
            config,
            stream_mode=["messages", "values"],
        ):
            if mode == "values":
                final = payload
        _assert_every_run_ends_well([(final, model)])
        injected += len(model.faults)
    assert injected >= 3


def test_agent_sync_invoke_under_chaos() -> None:
    injected = 0
    for seed in range(10):
        model = chaos(_no_malformed(200 + seed))
        agent = build_agent(model, [lookup_order, track_parcel], model_retry=FAST_RETRY)
        result = agent.invoke(
            {"messages": [("user", "Where is order A1?")]}, {"recursion_limit": 40}
        )
        _assert_every_run_ends_well([(result, model)])
        injected += len(model.faults)
    assert injected >= 3


@pytest.mark.postgres
async def test_200_runs_on_postgres_under_30_percent_faults_none_lost(
    fresh_postgres_url: str,
) -> None:
    """200 concurrent runs, keel's Postgres saver: each ends with an outcome and a valid
    history, and each thread reads back from a new pool exactly as the run returned it."""
    runs = 200

    def agent_on(saver: Any, model: Any) -> Any:
        return build_agent(
            model, [lookup_order, track_parcel], checkpointer=saver, model_retry=FAST_RETRY
        )

    def config(seed: int) -> Any:
        return {"configurable": {"thread_id": f"chaos-{seed}"}, "recursion_limit": 40}

    async with Persistence(fresh_postgres_url).acheckpointer() as saver:

        async def one(seed: int) -> tuple[dict[str, Any], ChaosChatModel]:
            model = chaos(ChaosPolicy.uniform(0.3, seed=seed))
            question = {"messages": [("user", "Where is order A1?")]}
            return await agent_on(saver, model).ainvoke(question, config(seed)), model

        results = await asyncio.gather(*(one(seed) for seed in range(runs)))
    _assert_every_run_ends_well(results)
    assert sum(len(model.faults) for _, model in results) > runs  # faults were injected
    async with Persistence(fresh_postgres_url).acheckpointer() as saver:
        reader = agent_on(saver, chaos(ChaosPolicy()))
        for seed, (result, _) in enumerate(results):
            state = await reader.aget_state(config(seed))
            assert state.next == (), seed
            assert state.values["outcome"] == result["outcome"], seed
            assert state.values["messages"] == result["messages"], seed
