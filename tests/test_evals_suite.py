"""Suites as files: loading, the model specs, and errors that name the file and the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from keel.errors import UserError
from keel.evals import ChaosChatModel, ScriptedChatModel
from keel.evals.suite import Suite, load_suite

SUITE = """
name: refunds
graph: keel.evals.builtin:demo_agent
model: keel:demo
cases:
  - id: approved
    input: Order A1001 arrived damaged.
    identity: {user: alice, tenant: acme, roles: [support, billing]}
    expect:
      status: success
      terminated_reason: completed
      trajectory:
        mode: unordered
        args: ignore
        overrides: {issue_refund: exact}
        calls: [lookup_order, {name: issue_refund, args: {order_id: A1001}}]
    rubric: Says sorry.
    budgets: {usd: 0.1, steps: 30}
  - id: scripted
    messages:
      - {role: system, content: be brief}
      - {role: user, content: hi}
    approvals: reject
    model:
      script:
        - {call: lookup_order, args: {order_id: A1}}
        - {calls: [{name: a, args: {x: 1}}, {name: b}]}
        - done
      chaos: {rate_limit: 0.5, seed: 3}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


def test_a_suite_file_loads_every_field(tmp_path: Path) -> None:
    suite = load_suite(write(tmp_path, SUITE))
    assert suite.name == "refunds" and suite.graph == "keel.evals.builtin:demo_agent"
    approved, scripted = suite.cases
    assert approved.messages == (("user", "Order A1001 arrived damaged."),)
    assert approved.identity.user_id == "alice" and approved.identity.roles == (
        "support",
        "billing",
    )
    assert approved.expect.status == "success"
    trajectory = approved.expect.trajectory
    assert trajectory is not None and trajectory.mode == "unordered" and trajectory.args == "ignore"
    assert [c["name"] for c in trajectory.calls] == ["lookup_order", "issue_refund"]
    assert trajectory.overrides == {"issue_refund": "exact"}
    assert approved.budgets.limits() == {"usd": 0.1, "steps": 30.0}
    assert scripted.approvals == "reject" and scripted.messages[0] == ("system", "be brief")
    assert suite.model is not None and suite.model.name == "keel:demo"


def test_an_inline_script_builds_a_fresh_scripted_model_wrapped_in_chaos(tmp_path: Path) -> None:
    spec = load_suite(write(tmp_path, SUITE)).cases[1].model
    assert spec is not None and spec.label == "chaos(script(3 turns))"
    first, second = spec.build(), spec.build()
    assert isinstance(first, ChaosChatModel) and first is not second
    inner = first.model
    assert isinstance(inner, ScriptedChatModel)
    parallel = inner.script[1]
    assert isinstance(parallel, AIMessage)
    assert [(c["name"], c["args"]) for c in parallel.tool_calls] == [("a", {"x": 1}), ("b", {})]
    turn = ScriptedChatModel(script=inner.script).invoke([HumanMessage("hi")])
    assert turn.tool_calls[0]["name"] == "lookup_order"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cases: []", "`cases` must be a non-empty list"),
        ("cases: [{input: hi}]", "every case needs an `id`"),
        ("cases: [{id: a}]", "give either `input`"),
        (
            "cases: [{id: a, input: x}, {id: a, input: y}]",
            "case ids must be unique; repeated: ['a']",
        ),
        ("cases: [{id: a, input: x, approvals: maybe}]", "approvals must be 'approve' or 'reject'"),
        ("cases: [{id: a, input: x, expec: {}}]", "unknown field(s) ['expec']"),
        ("cases: [{id: a, input: x, identity: {roles: admin}}]", "identity.roles must be a list"),
        ("cases: [{id: a, input: x, identity: {user: ''}}]", "identity.user must be a non-empty"),
        # an empty YAML value is null: it ran as the user named "None"
        ("cases: [{id: a, input: x, identity: {user: }}]", "identity.user must be a non-empty"),
        ("cases: [{id: a, input: x, identity: {tenant: [a]}}]", "identity.tenant must be"),
        ("cases: [{id: a, input: x, identity: {policy: true}}]", "identity.policy must be"),
        (
            'cases: [{id: a, input: x, identity: {user: "\\ud800"}}]',
            "identity.user must be text that can be stored",
        ),
        ("cases: [{id: a, input: x, budgets: {usd: -1}}]", "usd must be a number >= 0"),
        ("cases: [{id: a, input: x, budgets: {dollars: 1}}]", "unknown field(s) ['dollars']"),
        (
            "cases: [{id: a, input: x, expect: {trajectory: {mode: fuzzy}}}]",
            "mode must be one of ['strict', 'unordered', 'subset', 'superset']",
        ),
        ("cases: [{id: a, input: x, model: {chaos: {}}}]", "give a model `name` or a `script`"),
        (
            "cases: [{id: a, input: x, model: {name: keel:demo, chaos: {timeout: 2}}}]",
            "ChaosPolicy.timeout must be between 0 and 1",
        ),
        ("cases: [{id: a, input: x}]\nbogus: 1", "unknown field(s) ['bogus']"),
        # a careless file is refused, never read as something else (or raised as a KeyError)
        (
            "cases: [{id: a, input: x, expect: {forbidden_tools: issue_refund}}]",
            "expect: forbidden_tools must be a list of names, like [a, b], got 'issue_refund'",
        ),
        ("cases: [{id: a, input: x, tags: 5}]", "tags must be a list of names"),
        (
            "cases: [{id: a, input: x, expect: {trajectory: {calls: lookup_order}}}]",
            "trajectory: calls must be a list",
        ),
        (
            "cases: [{id: a, input: x, expect: {trajectory: [{args: {order_id: A1}}]}}]",
            "trajectory: calls[0]: every call needs a `name`",
        ),
        (
            "cases: [{id: a, input: x, expect: {trajectory: [{name: t, args: A1}]}}]",
            "trajectory: calls[0]: args must be a mapping, got 'A1'",
        ),
        (
            "cases: [{id: a, input: x, model: {script: [{calls: [{args: {}}]}]}}]",
            "model: script[0]: calls[0]: every call needs a `name`",
        ),
        (
            "cases: [{id: a, input: x, model: {script: [{call: t, args: [1]}]}}]",
            "script[0]: calls[0]: args must be a mapping",
        ),
        ("cases: [{id: a, input: x, model: {script: [hi], structured: [1]}}]", "structured must"),
        (
            "cases: [{id: a, input: x, expect: {trajectory: {calls: [t], overrides: [t]}}}]",
            "overrides must be a mapping",
        ),
        ("cases: [{id: a, input: }]", "`input` is empty"),
        # a list or a null read as its Python text ("['a']", "None") was sent to the agent
        ("cases: [{id: a, input: [a, b]}]", "input must be text, got ['a', 'b']"),
        (
            "cases: [{id: a, messages: [{role: user, content: }]}]",
            "message content must be text, got None",
        ),
        ("cases: [{id: a, input: x, model: {script: [{text: }]}}]", "script[0]: text must be text"),
        ("cases: [{id: a, input: x, budgets: {usd: .nan}}]", "usd must be a number >= 0, got nan"),
        # a count that is not whole was kept and compared as a float: 1.5 model calls
        (
            "cases: [{id: a, input: x, budgets: {model_calls: 1.5}}]",
            "cases[0] (a): budgets: model_calls is a count: a whole number >= 0, got 1.5.",
        ),
        ("cases: [{id: a, input: x, budgets: {steps: 2.0}}]", "steps is a count: a whole number"),
        ("cases: [{id: a, input: x, budgets: {tool_calls: .inf}}]", "tool_calls is a count"),
        ("cases: [{id: a, input: x, budgets: {total_tokens: 1.0e+3}}]", "total_tokens is a count"),
        (
            "cases: [{id: a, input: x, expect: {tools_succeed: 'false'}}]",
            "tools_succeed must be true or false, got 'false'",
        ),
        ("name: [a]\ncases: [{id: a, input: x}]", "name must be a string"),
        # a misspelt outcome would fail its case on every run, as if the agent were wrong
        (
            "cases: [{id: a, input: x, expect: {status: sucess}}]",
            "expect: status must be one of ['success', 'stopped', 'error', 'interrupted'], "
            "got 'sucess'",
        ),
        (
            "cases: [{id: a, input: x, expect: {terminated_reason: budget_exeeded}}]",
            "expect: terminated_reason must be one of ['completed', 'budget_exceeded',",
        ),
        ("- just a list", "must be a mapping, got list"),
    ],
)
def test_a_malformed_suite_names_the_file_the_case_and_the_fix(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_suite(path)
    assert str(path) in str(info.value)


def test_missing_and_broken_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.yaml' does not exist\. Give the path of a YAML"):
        load_suite(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match=f"^Suite file {re.escape(repr(str(tmp_path)))} is a dir"):
        load_suite(tmp_path)
    with pytest.raises(UserError, match="is not valid YAML"):
        load_suite(write(tmp_path, "cases: [unclosed"))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: café\ncases: [{id: a, input: x}]".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text") as info:
        load_suite(latin)
    assert str(latin) in str(info.value)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_suite_nested_past_the_parsers_depth_is_refused_not_a_recursion_error(
    tmp_path: Path, suffix: str
) -> None:
    """Unbalanced brackets pasted into a suite: PyYAML and `json` recurse per level and raised
    a bare RecursionError; the loader says which file and what to check."""
    deep = "[" * 5000 + "]" * 5000
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"cases": [{"id": "a", "input": ' + deep + "}]}")
    with pytest.raises(UserError, match="nests lists or mappings too deeply") as info:
        load_suite(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "twice.yaml",  # PyYAML kept the second `expect`: the case passed on the wrong outcome
            "cases:\n  - id: a\n    input: x\n    expect: {status: stopped}\n"
            "    budgets: {steps: 4}\n    expect: {forbidden_tools: [issue_refund]}\n",
            "is not valid YAML: 'expect' is given twice in one mapping: keep one",
        ),
        (
            "twice.json",
            '{"cases": [{"id": "a", "input": "x", "expect": {"status": "stopped"}, "expect": {}}]}',
            "is not valid JSON: 'expect' is given twice in one object: keep one",
        ),
    ],
)
def test_a_key_given_twice_is_refused_not_silently_replaced(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_suite(path)
    assert str(path) in str(info.value)


def test_a_yaml_merge_key_still_lets_later_keys_override_the_merged_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "cases:\n  - &base {id: a, input: hi}\n  - <<: *base\n    id: b\n")
    assert [(c.id, c.messages) for c in load_suite(path).cases] == [
        ("a", (("user", "hi"),)),
        ("b", (("user", "hi"),)),
    ]


def test_a_suite_named_by_a_number_or_a_yaml_boolean_loads(tmp_path: Path) -> None:
    for name in ("2024", "yes"):  # `capture` names a new suite after its file: 2024.yaml
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\ncases: [{{id: a, input: x}}]")
        assert load_suite(path).name in (name, "True")


def test_a_json_suite_is_read_as_json_and_broken_json_says_where(tmp_path: Path) -> None:
    tabs = tmp_path / "tabs.json"  # valid JSON that YAML refuses (a tab cannot start a token)
    tabs.write_text('{\n\t"model": "keel:demo",\n\t"cases": [{"id": "a", "input": "hi"}]\n}\n')
    assert [c.id for c in load_suite(tabs).cases] == ["a"]
    broken = tmp_path / "broken.json"
    broken.write_text('{"cases": [{"id": "a", "input": "hi"},]}')
    with pytest.raises(UserError, match=r"broken\.json' is not valid JSON: .*line 1 column 39"):
        load_suite(broken)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"cases": [{"id": "a", "input": "hi", "expected": {}}]}')
    with pytest.raises(UserError, match=r"unknown\.json: cases\[0\]: unknown field\(s\) \['exp"):
        load_suite(unknown)


def test_a_suite_can_be_built_in_python() -> None:
    suite = Suite.from_dict({"cases": [{"id": "a", "input": "hi", "model": "keel:demo"}]})
    assert suite.name == "suite" and suite.cases[0].model is not None
