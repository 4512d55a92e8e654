"""`keel eval --langsmith`: the suite as a LangSmith experiment, against a local stand-in API.

The dataset is created once and reused by name (a case added to the suite is added to it, the
others are not uploaded again); each run's keel scores reach the experiment; without a key the
command refuses and no connection is attempted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from langsmith_stand_in import LangSmithStandIn, watch_connections

from keel.errors import UserError
from keel.evals import builtin_suite
from keel.evals.builtin import builtin_suite_path
from keel.evals.cli import main as eval_main
from keel.evals.experiment import arun_experiment


def _first_case_only(tmp_path: Path) -> Path:
    data = yaml.safe_load(builtin_suite_path("demo").read_text())
    data["cases"] = data["cases"][:1]
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _feedback_keys(server: LangSmithStandIn) -> list[str]:
    """The evaluator results posted (langsmith batches them into `/runs/multipart`)."""
    keys = []
    for _method, path, body in server.requests:
        for part in body.split(b"\r\n--"):
            head, _, content = part.partition(b"\r\n\r\n")
            if b'name="feedback.' in head:
                keys.append(json.loads(content.rstrip(b"\r\n-"))["key"])
        if path == "/feedback":
            keys.append(json.loads(body)["key"])
    return keys


def test_the_dataset_is_created_once_and_reused(
    ls_keyed: LangSmithStandIn, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "out"
    assert eval_main([str(_first_case_only(tmp_path)), "--langsmith", "--out", str(out)]) == 0
    assert "LangSmith experiment 'demo-" in capsys.readouterr().out
    assert [d["name"] for d in ls_keyed.datasets.values()] == ["keel-demo"]
    assert sorted(e["inputs"]["case"] for e in ls_keyed.examples.values()) == ["refund-approved"]
    first_keys = _feedback_keys(ls_keyed)
    assert {"outcome", "trajectory", "tool_success", "budgets"} <= set(first_keys)
    assert list(out.glob("*.json")) and list(out.glob("*.html"))

    # the whole suite, with the same dataset name: reused, only the new case is uploaded
    assert eval_main(["demo", "--langsmith", "--out", str(out)]) == 0
    assert ls_keyed.paths("POST").count("/datasets") == 1
    cases = sorted(e["inputs"]["case"] for e in ls_keyed.examples.values())
    assert cases == sorted(c.id for c in builtin_suite("demo").cases)
    experiments = [s for s in ls_keyed.sessions.values() if (s["name"] or "").startswith("demo-")]
    assert len(experiments) == 2
    assert all(s.get("reference_dataset_id") for s in experiments)
    # every run of the second experiment was scored: one outcome result per case
    assert _feedback_keys(ls_keyed).count("outcome") == 1 + len(cases)


async def test_scores_come_back_for_local_reports(ls_keyed: LangSmithStandIn) -> None:
    result, name = await arun_experiment(builtin_suite("demo"), repeat=2, concurrency=2)
    assert name.startswith("demo-") and result.pass_rate == 1.0
    assert len(result.runs) == 2 * len(builtin_suite("demo").cases)
    assert all(run.scores for run in result.runs)
    assert sorted(r.repeat for r in result.runs if r.case.id == "refund-approved") == [0, 1]


async def test_without_a_key_nothing_touches_the_network(
    ls_keyless: LangSmithStandIn, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    attempts = watch_connections(monkeypatch)
    with pytest.raises(UserError, match="needs LANGSMITH_API_KEY"):
        await arun_experiment(builtin_suite("demo"))
    assert eval_main(["demo", "--langsmith"]) == 2
    assert "--langsmith needs LANGSMITH_API_KEY" in capsys.readouterr().err
    assert eval_main(["demo", "--dataset", "x"]) == 2
    assert attempts == [] and ls_keyless.requests == []


def test_price_reaches_the_experiments_graphs(
    ls_keyed: LangSmithStandIn, tmp_path: Path, capsys: Any
) -> None:
    """`keel eval --langsmith --price` runs the cases on the priced house model, as without
    --langsmith; without --price each case raises the `no price for model` error."""
    out = tmp_path / "out"
    argv = [str(_first_case_only(tmp_path)), "--langsmith", "--out", str(out)]
    argv += ["--model", "serve.house_model:demo"]
    assert eval_main(argv) == 1
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert "no price for model 'house-model'" in runs[0]["raised"]
    assert eval_main([*argv, "--price", "house-model=1,2"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs[0]["raised"] is None and runs[0]["usage"]["usd"] > 0
    assert eval_main([*argv, "--price", "house-model=1,2,3"]) == 2
    assert "--price 'house-model=1,2,3': give MODEL=INPUT,OUTPUT" in capsys.readouterr().err


@pytest.mark.parametrize("counts", [{"repeat": "3"}, {"repeat": 0}, {"concurrency": True}])
async def test_an_experiment_refuses_a_count_that_is_not_a_whole_number(
    ls_keyed: LangSmithStandIn, counts: dict[str, Any]
) -> None:
    # `repeat="3"` (a value read from a config file) raised a bare TypeError comparing it
    (name,) = counts
    with pytest.raises(UserError, match=f"{name} must be a whole number of 1 or more"):
        await arun_experiment(builtin_suite("demo"), **counts)
    assert ls_keyed.requests == []
