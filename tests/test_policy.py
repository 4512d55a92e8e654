"""`keel.guards.Policy`: built from Python, a dict, or a TOML / YAML file, and validated.

Every validation error names the field and the fix; the exact messages users see are asserted
for the common mistakes.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from keel import UserError
from keel.guards import Budget, LoopPolicy, Policy, Rule

TOML = """\
name = "support"
version = "3"

[budget]
usd = 0.50
model_calls = 20

[loop]
max_repeats = 4
on_loop = "wrap_up"

[[rules]]
role = "support"
tool = "lookup_*"
action = "allow"

[[rules]]
role = "support"
tool = "issue_refund"
resource = "orders/*"
action = "ask"
reason = "refunds need a manager"
"""

YAML = """\
name: support
version: "3"
budget:
  usd: 0.5
  model_calls: 20
loop:
  max_repeats: 4
  on_loop: wrap_up
rules:
  - role: support
    tool: "lookup_*"
    action: allow
  - role: support
    tool: issue_refund
    resource: "orders/*"
    action: ask
    reason: refunds need a manager
"""

EXPECTED = Policy(
    name="support",
    version="3",
    budget=Budget(usd=0.5, model_calls=20),
    loop=LoopPolicy(max_repeats=4, on_loop="wrap_up"),
    rules=(
        Rule(role="support", tool="lookup_*", action="allow"),
        Rule(
            role="support",
            tool="issue_refund",
            resource="orders/*",
            action="ask",
            reason="refunds need a manager",
        ),
    ),
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- Python construction ------------------------------------------------------------------


def test_defaults_deny_everything_and_guard_loops() -> None:
    policy = Policy()
    assert policy.identity == "default@1"
    assert policy.rules == ()
    assert policy.budget is None
    assert policy.loop == LoopPolicy(max_repeats=3, max_cycles=2, on_loop="stop")


def test_identity_is_name_at_version() -> None:
    assert Policy(name="support", version="3").identity == "support@3"


def test_rules_given_as_a_list_are_stored_as_a_tuple() -> None:
    rule = Rule(action="allow")
    policy = Policy(rules=[rule])  # type: ignore[arg-type]
    assert policy.rules == (rule,)
    hash(policy)  # frozen and hashable


def test_policy_fields_are_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        Policy("support")  # type: ignore[misc]
    policy = Policy()
    with pytest.raises(AttributeError):
        policy.version = "2"  # type: ignore[misc]


def test_budget_limits_lists_only_the_set_limits() -> None:
    assert Budget().limits() == {}
    assert Budget(usd=0.5, tool_calls=3, soft_ratio=0.5).limits() == {"usd": 0.5, "tool_calls": 3}


def test_rule_describe() -> None:
    rule = Rule(role="support", tool="issue_refund", resource="orders/*", action="ask")
    assert rule.describe() == "support | issue_refund | orders/* → ask"
    assert Rule(action="deny").describe() == "* | * | * → deny"


# -- validation: exact messages ------------------------------------------------------------


def test_bad_rule_action_names_the_choices() -> None:
    with pytest.raises(UserError) as info:
        Rule(tool="issue_refund", action="permit")  # type: ignore[arg-type]
    assert str(info.value) == (
        "Rule.action must be one of ['allow', 'deny', 'ask'], got 'permit' "
        "(rule for tool 'issue_refund')."
    )


@pytest.mark.parametrize("field", ["role", "tool", "resource"])
def test_empty_rule_globs_say_use_star(field: str) -> None:
    with pytest.raises(UserError) as info:
        Rule(action="allow", **{field: ""})  # type: ignore[arg-type]
    assert str(info.value) == (
        f"Rule.{field} must be a non-empty string (use '*' for any), got ''."
    )


@pytest.mark.parametrize("usd", [0, -0.5])
def test_budget_usd_must_be_positive(usd: float) -> None:
    with pytest.raises(UserError) as info:
        Budget(usd=usd)
    assert str(info.value) == (
        "Budget.usd must be a finite number greater than 0 (e.g. usd=0.5), or None to disable it; "
        f"got {usd!r}."
    )


def test_budget_rejects_non_numbers() -> None:
    with pytest.raises(
        UserError, match=re.escape("Budget.model_calls is a count: a whole number greater than 0")
    ):
        Budget(model_calls="20")  # type: ignore[arg-type]


@pytest.mark.parametrize("ratio", [0, 1.5])
def test_budget_soft_ratio_is_a_share(ratio: float) -> None:
    with pytest.raises(UserError) as info:
        Budget(soft_ratio=ratio)
    assert str(info.value) == (
        f"Budget.soft_ratio must be a number in (0, 1], e.g. 0.8; got {ratio!r}."
    )


def test_loop_policy_messages() -> None:
    with pytest.raises(UserError) as info:
        LoopPolicy(max_repeats=1)
    assert str(info.value) == (
        "LoopPolicy.max_repeats must be a whole number, 2 or more (e.g. 3); got 1."
    )
    with pytest.raises(UserError) as info:
        LoopPolicy(on_loop="retry")  # type: ignore[arg-type]
    assert str(info.value) == "LoopPolicy.on_loop must be 'stop' or 'wrap_up', got 'retry'."
    with pytest.raises(UserError) as info:
        LoopPolicy(max_cycles=-1)
    assert str(info.value) == (
        "LoopPolicy.max_cycles must be 2 or more, or 0 to disable cycle detection; got -1."
    )


def test_policy_name_and_rules_are_checked() -> None:
    with pytest.raises(UserError) as info:
        Policy(version=" ")
    assert str(info.value) == "Policy.version must be a non-empty string, got ' '."
    with pytest.raises(UserError) as info:
        Policy(rules=({"action": "allow"},))  # type: ignore[arg-type]
    assert str(info.value) == (
        "Policy.rules[0] must be a Rule(action=..., role=..., tool=..., resource=...), "
        "got {'action': 'allow'}."
    )


@pytest.mark.parametrize("field", ["rules", "rate_limits", "period_budgets"])
@pytest.mark.parametrize("value", [Rule(action="allow", tool="x"), "allow *", {"tool": "x"}, 3])
def test_policy_lists_given_one_item_or_text_say_how_to_write_them(field: str, value: Any) -> None:
    # one Rule alone raised a bare TypeError ("'Rule' object is not iterable")
    with pytest.raises(
        UserError, match=rf"^Policy\.{field} must be a list or tuple, got .*: write"
    ):
        Policy(**{field: value})
    assert Policy(**{field: []}) == Policy()  # a list is taken, as a tuple


# -- from_dict ------------------------------------------------------------------------------


def test_unknown_policy_field_lists_the_fields() -> None:
    # every field of Policy can be loaded from a file, and the message lists them all
    known = sorted(f.name for f in fields(Policy))
    assert {"budget", "loop", "name", "rules", "version"} <= set(known)
    with pytest.raises(UserError) as info:
        Policy.from_dict({"name": "p", "budgets": {"usd": 1}})
    assert str(info.value) == f"Unknown policy field(s) ['budgets']; the fields are {known}."


def test_unknown_field_inside_budget_lists_the_allowed_ones() -> None:
    with pytest.raises(UserError) as info:
        Policy.from_dict({"budget": {"dollars": 1}})
    assert str(info.value) == (
        "Unknown field(s) ['dollars'] in policy 'budget'; allowed: ['input_tokens', "
        "'model_calls', 'output_tokens', 'soft_ratio', 'steps', 'tool_calls', 'usd', "
        "'wall_seconds']."
    )


def test_a_bad_value_in_a_section_says_where() -> None:
    with pytest.raises(UserError) as info:
        Policy.from_dict({"budget": {"usd": 0}})
    assert str(info.value) == (
        "In policy 'budget': Budget.usd must be a finite number greater than 0 (e.g. usd=0.5), "
        "or None to disable it; got 0."
    )
    with pytest.raises(UserError) as info:
        Policy.from_dict({"rules": [{"action": "allow"}, {"tool": "x", "action": "maybe"}]})
    assert str(info.value) == (
        "In policy 'rules[1]': Rule.action must be one of ['allow', 'deny', 'ask'], "
        "got 'maybe' (rule for tool 'x')."
    )


def test_a_rule_without_action_names_the_missing_field() -> None:
    with pytest.raises(UserError, match=r"^In policy 'rules\[0\]': .*'action'"):
        Policy.from_dict({"rules": [{"tool": "x"}]})


def test_rules_must_be_a_list_and_the_policy_a_mapping() -> None:
    with pytest.raises(UserError) as info:
        Policy.from_dict({"rules": "allow everything"})
    assert str(info.value) == "Policy 'rules' must be a list of tables/mappings."
    with pytest.raises(UserError) as info:
        Policy.from_dict(["name", "p"])  # type: ignore[arg-type]
    assert str(info.value) == "A policy must be a mapping of fields, got list."


def test_loop_none_disables_the_loop_guard() -> None:
    assert Policy.from_dict({"loop": None}).loop is None


def test_an_integer_version_is_kept_as_text() -> None:
    assert Policy.from_dict({"name": "p", "version": 3}).identity == "p@3"


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_an_unquoted_decimal_version_is_not_silently_rounded(tmp_path: Path, suffix: str) -> None:
    text = 'name = "p"\nversion = 1.10\n' if suffix == ".toml" else "name: p\nversion: 1.10\n"
    with pytest.raises(UserError, match="version"):
        Policy.from_file(write(tmp_path, f"policy{suffix}", text))


# -- from_file ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [("policy.toml", TOML), ("policy.yaml", YAML)])
def test_from_file_reads_toml_and_yaml(tmp_path: Path, name: str, text: str) -> None:
    policy = Policy.from_file(write(tmp_path, name, text))
    assert policy == EXPECTED
    assert policy.identity == "support@3"


def test_from_file_reads_yml_and_takes_a_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yml", YAML)
    assert Policy.from_file(str(path)) == EXPECTED


def test_from_file_rejects_other_suffixes(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.json", "{}")
    with pytest.raises(UserError) as info:
        Policy.from_file(path)
    assert str(info.value) == (
        f"Policy file {str(path)!r}: use a .toml, .yaml or .yml file, not '.json'."
    )


def test_from_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(UserError) as info:
        Policy.from_file(path)
    assert str(info.value) == f"Policy file {str(path)!r} does not exist."


def test_from_file_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.toml", 'name = "support\n')
    with pytest.raises(UserError) as info:
        Policy.from_file(path)
    message = str(info.value)
    assert message.startswith(f"Policy file {str(path)!r} is not valid TOML: ")
    assert "line 1" in message


@pytest.mark.parametrize("name", ["deep.yaml", "deep.toml"])
def test_from_file_nested_past_the_parsers_depth_is_refused_not_a_recursion_error(
    tmp_path: Path, name: str
) -> None:
    """PyYAML and `tomllib` recurse per level of nesting: a bare RecursionError before."""
    deep = "[" * 5000 + "]" * 5000
    text = f"name: p\nrules: {deep}\n" if name.endswith(".yaml") else f'name = "p"\nx = {deep}\n'
    path = write(tmp_path, name, text)
    with pytest.raises(UserError, match="nests lists or mappings too deeply") as info:
        Policy.from_file(path)
    assert str(info.value).startswith(f"Policy file {str(path)!r} ")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (  # PyYAML kept the second `budget`: the first one's usd limit was silently dropped
            "twice.yaml",
            "name: p\nbudget: {usd: 1}\nrules: []\nbudget: {steps: 5}\n",
            "is not valid YAML: 'budget' is given twice in one mapping: keep one at line 4, "
            "column 1.",
        ),
        (  # tomllib refuses it itself; the message now says what that means
            "twice.toml",
            "name = 'p'\n[budget]\nusd = 1\n[budget]\nsteps = 5\n",
            "is not valid TOML: Cannot declare ('budget',) twice (at line 4, column 8); "
            "a key or table is given twice: keep one.",
        ),
        (
            "key.toml",
            "name = 'p'\nname = 'q'\n",
            "is not valid TOML: Cannot overwrite a value (at line 2, column 11); "
            "a key or table is given twice: keep one.",
        ),
    ],
)
def test_from_file_a_key_given_twice_is_refused_not_silently_replaced(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(UserError) as info:
        Policy.from_file(path)
    assert str(info.value).startswith(f"Policy file {str(path)!r} {message}"), str(info.value)


def test_from_file_a_yaml_merge_key_still_lets_later_keys_override(tmp_path: Path) -> None:
    text = "name: p\nrules:\n  - &b {tool: '*', action: deny}\n  - <<: *b\n    action: allow\n"
    path = write(tmp_path, "merge.yaml", text)
    assert [r.action for r in Policy.from_file(path).rules] == ["deny", "allow"]


def test_from_file_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yaml", "rules: [unclosed\n")
    with pytest.raises(UserError, match=r"is not valid YAML: ") as info:
        Policy.from_file(path)
    # one line, where the mistake is (PyYAML's own text spans five, quoting the line)
    assert "\n" not in str(info.value)
    assert str(info.value).endswith(
        "expected ',' or ']', but got '<stream end>' at line 2, column 1 "
        "(while parsing a flow sequence at line 1, column 8)."
    )


def test_from_file_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.toml", "[budget]\nusd = -1\n")
    with pytest.raises(UserError) as info:
        Policy.from_file(path)
    assert str(info.value) == (
        f"Policy file {str(path)!r}: In policy 'budget': Budget.usd must be a finite number "
        "greater than 0 (e.g. usd=0.5), or None to disable it; got -1."
    )


def test_an_empty_yaml_file_is_not_a_policy(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yaml", "")
    with pytest.raises(UserError) as info:
        Policy.from_file(path)
    assert str(info.value) == (
        f"Policy file {str(path)!r}: A policy must be a mapping of fields, got NoneType."
    )
