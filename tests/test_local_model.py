"""keel's local model (`local:`): what needs no model file, then end to end on the real model.

The `local_model` tests load the real model once per session (llama.cpp, Qwen2.5-Coder-1.5B
Q4_K_M). Without llama-cpp-python or the model file they are skipped, with the install
command; in CI (`CI=true`) that is a failure, as a missing PostgreSQL is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from keel import RunContext
from keel.app.demo import DEMO_TASK, SYSTEM_PROMPT, DemoShop, demo_policy, demo_tools
from keel.errors import ModelRequestsForbidden, SetupError, UserError
from keel.evals import ScriptedChatModel, forbid_model_requests
from keel.graphs import build_agent
from keel.guards import Budget, GuardedModel
from keel.local_model import FINAL_ANSWER, LocalChatModel, local_chat_model
from keel.model_files import DEFAULT_LOCAL_MODEL, LocalModelFile, assemble, models_dir
from keel.models import resolve_model
from keel.nodes.plan import Plan
from keel.nodes.verify import JUDGE_PROMPT, JudgeVerdict
from keel.pricing import PriceTable

CTX = RunContext(user_id="alice", tenant_id="acme", roles=("customer",))


# -- no model needed ---------------------------------------------------------------------------


def _chunks(tmp_path: Path, parts: list[bytes], package: str) -> LocalModelFile:
    """Chunk packages like the real ones, importable from `tmp_path`."""
    for i, data in enumerate(parts, start=1):
        folder = tmp_path / "site" / f"{package.replace('-', '_')}{i}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "data" / f"part{i:02d}.bin").write_bytes(data)
    whole = b"".join(parts)
    return LocalModelFile(
        name="fake",
        filename="fake.gguf",
        sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        package=package,
        parts=len(parts),
        version="0.0.1",
    )


@pytest.fixture
def site(tmp_path: Path) -> Any:
    sys.path.insert(0, str(tmp_path / "site"))
    yield
    sys.path.remove(str(tmp_path / "site"))
    importlib.invalidate_caches()


def test_assemble_joins_chunks_in_order_checks_the_hash_and_is_idempotent(
    tmp_path: Path, site: None
) -> None:
    model = _chunks(tmp_path, [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7], "keelfake-ok-part")
    importlib.invalidate_caches()
    path = assemble(model, tmp_path / "models")
    assert path.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 50 + b"c" * 7
    mtime = path.stat().st_mtime_ns
    assert assemble(model, tmp_path / "models") == path
    assert path.stat().st_mtime_ns == mtime, "a verified file is kept, not rewritten"


def test_assemble_refuses_a_damaged_chunk_and_leaves_no_file(tmp_path: Path, site: None) -> None:
    model = _chunks(tmp_path, [b"one", b"two"], "keelfake-bad-part")
    (tmp_path / "site" / "keelfake_bad_part2" / "data" / "part02.bin").write_bytes(b"tw0")
    importlib.invalidate_caches()
    with pytest.raises(SetupError, match="sha256"):
        assemble(model, tmp_path / "models")
    assert not list((tmp_path / "models").iterdir()), "no partial or bad model is left behind"


def test_a_missing_chunk_package_names_the_install_command(tmp_path: Path) -> None:
    model = LocalModelFile(
        name="x", filename="x.gguf", sha256="0" * 64, size=1, package="keelfake-absent-part",
        parts=2, version="0.0.1",
    )  # fmt: skip
    with pytest.raises(SetupError, match="keel models install"):
        assemble(model, tmp_path)


def test_models_dir_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEEL_MODELS_DIR", str(tmp_path))
    assert models_dir() == tmp_path
    assert DEFAULT_LOCAL_MODEL.path() == tmp_path / DEFAULT_LOCAL_MODEL.filename
    monkeypatch.delenv("KEEL_MODELS_DIR")
    assert models_dir() == Path.home() / ".cache/keel/models"


def test_keel_models_path_says_where_and_whether_installed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from keel.app.cli import main

    monkeypatch.setenv("KEEL_MODELS_DIR", str(tmp_path))
    assert main(["models", "path"]) == 1
    where = tmp_path / DEFAULT_LOCAL_MODEL.filename
    assert capsys.readouterr().out == f"{where} (not installed: run `keel models install`)\n"


def test_a_missing_model_file_names_keel_models_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEEL_MODELS_DIR", str(tmp_path))
    if importlib.util.find_spec("llama_cpp") is None:
        with pytest.raises(SetupError, match=r"langgraph-keel\[local\]"):
            resolve_model("local:")
        return
    with pytest.raises(SetupError, match="keel models install") as err:
        resolve_model("local:")
    assert str(tmp_path) in str(err.value)


def test_a_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails, as when not installed
    with pytest.raises(SetupError, match=r"pip install 'langgraph-keel\[local\]'"):
        local_chat_model()


def test_unknown_local_model_and_tool_choice_are_user_errors() -> None:
    with pytest.raises(UserError, match=r"qwen2\.5-coder-1\.5b"):
        resolve_model("local:llama-70b")
    with pytest.raises(UserError, match="tool_choice"):
        LocalChatModel().bind_tools(demo_tools(), tool_choice="delete_everything")


def test_the_request_is_a_json_schema_over_the_tools_plus_an_answer() -> None:
    model = LocalChatModel(model_path="unused.gguf")
    tools = demo_tools()
    auto = model.bind_tools(tools).kwargs  # type: ignore[attr-defined]
    request = model.request([HumanMessage("hi")], **auto)
    branches = request["response_format"]["schema"]["oneOf"]
    names = [b["properties"]["name"]["const"] for b in branches]
    assert names == ["lookup_order", "search_policy", "issue_refund", FINAL_ANSWER]
    refund = branches[2]["properties"]["arguments"]
    assert set(refund["required"]) == {"order_id", "amount", "reason"}
    assert "issue_refund(order_id: string, amount: number" in request["messages"][0]["content"]

    anyone = model.request(
        [HumanMessage("hi")], **model.bind_tools(tools, tool_choice="any").kwargs
    )  # type: ignore[attr-defined]
    assert FINAL_ANSWER not in str(anyone["response_format"]["schema"])
    forced = model.bind_tools(tools, tool_choice="search_policy").kwargs  # type: ignore[attr-defined]
    one = model.request([HumanMessage("hi")], **forced)
    assert one["response_format"]["schema"]["required"] == ["topic"]  # the arguments, directly


def test_history_renders_tool_calls_as_the_json_the_model_writes() -> None:
    model = LocalChatModel(model_path="unused.gguf")
    messages = [
        SystemMessage("be brief"),
        HumanMessage("where is A1?"),
        AIMessage("", tool_calls=[{"name": "lookup_order", "args": {"order_id": "A1"}, "id": "c"}]),
        ToolMessage("shipped", tool_call_id="c", name="lookup_order"),
        SystemMessage("remember: user likes email"),
    ]
    chat = model.request(messages)["messages"]
    assert chat[0] == {"role": "system", "content": "be brief\n\nremember: user likes email"}
    assert chat[2] == {
        "role": "assistant",
        "content": '{"name": "lookup_order", "arguments": {"order_id": "A1"}}',
    }
    assert chat[3] == {"role": "tool", "content": "lookup_order returned: shipped"}


def test_the_local_model_costs_nothing_and_is_allowed_offline() -> None:
    assert PriceTable().cost("local:qwen2.5-coder-1.5b", {"input_tokens": 10**6}) == 0.0
    with forbid_model_requests(), pytest.raises(ModelRequestsForbidden):
        _NetworkModel().invoke("hi")


class _NetworkModel(ScriptedChatModel):
    """Stands in for a provider's model (not a test double): must be refused in tests."""

    keel_test_double: bool = False


# -- on the real model -------------------------------------------------------------------------


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() in ("true", "1"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def local() -> LocalChatModel:
    """The real local model, loaded once for the session."""
    if importlib.util.find_spec("llama_cpp") is None:
        _missing("the local model needs llama-cpp-python: run `make local-model`")
    if not DEFAULT_LOCAL_MODEL.path().is_file():
        _missing(f"no local model at {DEFAULT_LOCAL_MODEL.path()}: run `make local-model`")
    model = local_chat_model()
    model._loaded()
    return model


def _agent(model: LocalChatModel, **options: Any) -> Any:
    shop = DemoShop()
    agent = build_agent(
        model,
        demo_tools(shop),
        system_prompt=SYSTEM_PROMPT,
        policy=options.pop("policy", demo_policy()),
        checkpointer=InMemorySaver(),
        **options,
    )
    return agent, shop


@pytest.mark.local_model
@pytest.mark.parametrize(
    ("ask", "tool", "args"),
    [
        ("What did I order in A1002?", "lookup_order", {"order_id": "A1002"}),
        ("What is your refund policy for damaged items?", "search_policy", None),
    ],
)
def test_the_model_picks_the_right_tool_with_sensible_arguments(
    local: LocalChatModel, ask: str, tool: str, args: dict[str, Any] | None
) -> None:
    system = "You are a support agent for an online shop."
    answer = local.bind_tools(demo_tools()).invoke([("system", system), ("user", ask)])
    assert [c["name"] for c in answer.tool_calls] == [tool]
    call = answer.tool_calls[0]
    if args is not None:
        assert call["args"] == args
    else:
        assert "refund" in call["args"]["topic"].lower()
    assert call["id"] and call["id"].startswith("call_")
    usage = answer.usage_metadata
    assert usage is not None and usage["input_tokens"] > 100 and usage["output_tokens"] > 3


@pytest.mark.local_model
async def test_a_chat_needs_no_tool_and_streams_without_blocking_the_loop(
    local: LocalChatModel,
) -> None:
    bound = local.bind_tools(demo_tools())
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticker = asyncio.create_task(tick())
    start = time.perf_counter()
    chunks = [c async for c in bound.astream([("user", "Thanks, that's all. Goodbye!")])]
    took = time.perf_counter() - start
    ticker.cancel()
    text = "".join(str(c.content) for c in chunks)
    assert text and not any(c.tool_call_chunks for c in chunks)  # type: ignore[attr-defined]
    assert len([c for c in chunks if c.content]) > 2, "the answer streams in pieces"
    assert ticks >= took / 0.05 * 0.5, "the event loop kept running during the call"
    whole = bound.invoke([("user", "Thanks, that's all. Goodbye!")])
    assert whole.text == text, "streamed and invoked answers agree (temperature 0)"


@pytest.mark.local_model
async def test_a_plan_and_a_judge_verdict_through_keels_guarded_calls(
    local: LocalChatModel,
) -> None:
    planner = GuardedModel([local], schema=Plan)
    got = await planner.ainvoke(
        [("system", "Write a short plan for the task."), ("user", DEMO_TASK)], None, CTX
    )
    plan = got.output["parsed"]
    assert isinstance(plan, Plan) and 1 <= len(plan.steps) <= 10
    assert got.usage is not None and got.usage["input_tokens"] > 0 and got.usage["usd"] == 0.0

    judge = GuardedModel([local], schema=JudgeVerdict)
    verdicts = []
    for answer in (
        "You ordered a tea sampler ($18.00); it has shipped.",
        "You ordered a ceramic teapot; it was delivered yesterday.",
    ):  # as keel's verify node asks: the task, what the tools returned, the answer
        asked = (
            "Task:\nWhat did I order in A1002?\n\nWhat the tools returned:\n- lookup_order: "
            f"Order A1002: tea sampler, total $18.00, shipped.\n\nAnswer:\n{answer}"
        )
        judged = await judge.ainvoke([("system", JUDGE_PROMPT), ("user", asked)], None, CTX)
        verdicts.append(judged.output["parsed"])
    assert [v.passed for v in verdicts] == [True, False]


@pytest.mark.local_model
async def test_the_refund_waits_for_approval_and_runs_once_with_the_approved_args(
    local: LocalChatModel,
) -> None:
    agent, shop = _agent(local)
    config: Any = {"configurable": {"thread_id": "local-approval"}}
    await agent.ainvoke({"messages": [("user", DEMO_TASK)]}, config, context=CTX)
    state = await agent.aget_state(config)
    if not state.interrupts:  # a weak model may answer without refunding: then nothing ran
        assert shop.refunds == []
        return
    (request,) = state.interrupts[0].value
    assert request["action_request"]["action"] == "issue_refund"
    assert shop.refunds == [], "nothing is refunded before a human approves"
    approved = request["action_request"]["args"]
    final = await agent.ainvoke(
        Command(resume=[{"type": "approve", "reviewer": "test"}]), config, context=CTX
    )
    assert shop.refunds == [(approved["order_id"], approved["amount"])]
    assert final["outcome"]["status"] in ("success", "stopped")
    assert final["usage"]["usd"] == 0.0 and final["usage"]["input_tokens"] > 0


@pytest.mark.local_model
async def test_a_run_under_a_budget_stops_as_budget_exceeded(local: LocalChatModel) -> None:
    tight = dataclasses.replace(demo_policy(), budget=Budget(model_calls=1))
    agent, shop = _agent(local, policy=tight)
    final = await agent.ainvoke(
        {"messages": [("user", DEMO_TASK)]},
        {"configurable": {"thread_id": "local-budget"}},
        context=CTX,
    )
    assert final["usage"]["model_calls"] == 1, "never a call past the budget"
    assert shop.refunds == []
    first = next(m for m in final["messages"] if isinstance(m, AIMessage))
    if first.tool_calls:  # the task needs more calls than the budget allows: stopped, said why
        assert final["outcome"]["terminated_reason"] == "budget_exceeded"
        assert "model_calls" in final["outcome"]["detail"]
    else:
        assert final["outcome"]["terminated_reason"] == "completed"


@pytest.mark.local_model
def test_a_tool_decision_with_every_socket_refused(
    local: LocalChatModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        tried.append(args)
        raise OSError("the network is off in this test")

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    answer = resolve_model("local:").bind_tools(demo_tools()).invoke("Where is order A1002?")
    assert [c["name"] for c in answer.tool_calls] == ["lookup_order"] and tried == []


@pytest.mark.local_model
@pytest.mark.parametrize("spelling", ["local", "local:", "local:qwen2.5-coder-1.5b"])
def test_every_spelling_of_local_is_the_one_model_sharing_one_load_and_lock(
    local: LocalChatModel, spelling: str
) -> None:
    model = resolve_model(spelling)
    assert isinstance(model, LocalChatModel) and model.model_name == local.model_name
    assert model is not local and model._loaded() is local._loaded()  # one per process


def test_a_cpu_with_amx_gets_its_instruction_sets_without_llama_cpp_s_amx_kernels() -> None:
    """llama.cpp built native on a CPU with AMX segfaults at the first inference on virtualized
    Xeons (measured on this project's CI machines): such a CPU is built without AMX."""
    from keel.app.cli_models import BUILD_FLAGS, build_flags

    xeon = frozenset({"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile"})
    flags = build_flags(xeon).split()
    assert "-DGGML_NATIVE=OFF" in flags and "-DLLAVA_BUILD=OFF" in flags
    assert {"-DGGML_AVX2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON"} <= set(flags)
    assert not [f for f in flags if "AMX" in f]
    assert build_flags(frozenset({"avx", "avx2", "fma"})) == BUILD_FLAGS  # native, as before
    assert build_flags(frozenset()) == BUILD_FLAGS  # unknown CPU (not Linux): native


@pytest.mark.parametrize("where", ["a-file", "a-file/models", "/proc/keel-models"])
def test_a_models_folder_keel_cannot_make_is_one_line_before_anything_installs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Found by attack: `keel models install --dir FILE` (or a folder it cannot make) died in a
    traceback, and only after pip had installed the extra and the chunks."""
    from keel.app import cli_models
    from keel.app.cli import main

    def no_pip(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip ran before the folder was checked")

    monkeypatch.setattr(cli_models, "_pip", no_pip)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    assert main(["models", "install", "--no-extra", "--dir", where]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"keel: cannot make the models folder {where!r}: ")
    assert err.count("\n") == 1 and "--dir (or KEEL_MODELS_DIR) a folder keel can write" in err
