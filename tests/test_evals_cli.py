"""`keel eval`: progress lines, JSON / Markdown / self-contained HTML results, the pass-rate gate,
and a suite as parametrized pytest tests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from langchain_core.language_models import BaseChatModel

from keel.app.cli import main as keel_main
from keel.evals import builtin_suite, load_suite
from keel.evals.builtin import demo_agent
from keel.evals.testing import CaseFailed, check_case, suite_cases

MIXED = """
name: mixed
model: keel:demo
cases:
  - id: right
    input: Order A1001 arrived damaged. Please refund it.
    expect: {status: success}
  - id: wrong
    input: Order A1001 arrived damaged. Please refund it.
    approvals: reject
    expect: {status: success}
"""


def test_keel_eval_runs_a_builtin_suite_and_writes_the_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keel_main(["eval", "demo", "--out", str(tmp_path), "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^\[\d/4\] PASS refund-", out, flags=re.M)) == 4
    assert "demo: 4/4 passed (100.0%, ok)" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["pass_rate"] == 1.0 and len(data["runs"]) == 4
    assert data["runs"][0]["trajectory"][0] == {
        "name": "lookup_order",
        "args": {"order_id": "A1001"},
        "status": "success",
    }
    assert (
        "| refund-approved | 0 | pass | success/completed |"
        in (tmp_path / "results.md").read_text()
    )
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") == 4 and "refund-rejected" in html
    for svg in re.findall(r"<svg.*?</svg>", html, flags=re.S):
        assert ElementTree.fromstring(svg).tag == "{http://www.w3.org/2000/svg}svg"  # well-formed
    for chart in ("success rate per case", "cost (USD)", "steps", "latency (s)"):
        assert chart in html
    # self-contained: no script, no stylesheet or image from anywhere
    assert "<script" not in html and "src=" not in html and "href=" not in html
    assert re.findall(r"https?://[^'\"]+", html) == ["http://www.w3.org/2000/svg"] * 4


def test_keel_eval_exits_non_zero_under_the_pass_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "mixed.yaml"
    suite.write_text(MIXED)
    out = str(tmp_path / "out")
    assert keel_main(["eval", str(suite), "--out", out]) == 1
    printed = capsys.readouterr().out
    assert "FAIL wrong #0 stopped/rejected" in printed and "failed: outcome" in printed
    assert "1/2 passed (50.0%, UNDER 100%)" in printed
    assert keel_main(["eval", str(suite), "--out", out, "--min-pass-rate", "0.5"]) == 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'class="FAIL"' in html and "outcome: {&#x27;status&#x27;: &#x27;stopped&#x27;}" in html


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/keel-escaped", "a/../../b"])
def test_a_suites_name_cannot_put_its_reports_outside_keel_evals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Without --out, reports go to .keel/evals/<suite name>; the name comes from a file someone
    else may have written, so it stays one folder under .keel/evals."""
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    suite = tmp_path / "suite.yaml"
    suite.write_text(MIXED.replace("name: mixed", f"name: {json.dumps(name)}", 1))
    keel_main(["eval", str(suite)])
    (written,) = (work / ".keel" / "evals").iterdir()
    assert (written / "results.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.yaml", "work"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["here"]
    assert not Path("/tmp/keel-escaped").exists()


def test_keel_eval_bad_input_exits_2_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert keel_main(["eval", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist. Give the path of a YAML suite." in capsys.readouterr().err
    assert keel_main(["eval", "demo", "--graph", "nope"]) == 2
    assert "--graph must be 'module:function'" in capsys.readouterr().err
    assert keel_main(["eval", "demo", "--graph", "no_such_module:f"]) == 2
    assert "Cannot load graph factory 'no_such_module:f'" in capsys.readouterr().err
    assert not (tmp_path / ".keel").exists()  # refused before the results folder is made
    assert keel_main(["eval", "demo", "--min-pass-rate", "2"]) == 2
    taken = tmp_path / "taken"
    taken.write_text("")
    assert keel_main(["eval", "demo", "--out", str(taken)]) == 2  # 2, never 1 (under the rate)
    out = capsys.readouterr()
    assert "cannot write the results into" in out.err
    assert "[1/" not in out.out  # said before the suite runs: no run's results are lost
    shadow = ["eval", "shadow", "demo", "--candidate-model", "keel:demo", "--out", str(taken)]
    assert keel_main(shadow) == 2
    out = capsys.readouterr()
    assert "cannot write the results into" in out.err
    assert "CHANGED" not in out.out and "same" not in out.out  # nothing ran


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["eval", "   "],
            "keel eval: Suite file '   ' does not exist. Give the path of a YAML suite.",
        ),
        (["eval", "demo", "--repeat", "0"], "argument --repeat: '0' is not a whole number"),
        (["eval", "demo", "--repeat", "-1"], "argument --repeat: '-1' is not a whole number"),
        (["eval", "demo", "--repeat", "x"], "argument --repeat: 'x' is not a whole number"),
        (["eval", "demo", "--repeat", "1000000001"], "'1000000001' is not a whole number from 1"),
        (["eval", "demo", "--concurrency", "-3"], "argument --concurrency: '-3' is not a whole"),
        (["eval", "demo", "--model", "x\udcff"], "--model 'x\\udcff' holds a lone surrogate"),
        (["eval", "feedback", "\udcff", "--score", "1"], "the run '\\udcff' holds a lone surro"),
        (["eval", "replay", "\udcff", "--graph", "m:f"], "the thread '\\udcff' holds a lone"),
        (["eval", "capture", "\udcff", "--suite", "s.yaml"], "the thread '\\udcff' holds a"),
        (["eval", "shadow", "--threads", "\udcff", "--candidate", "m:f"], "--threads '\\udcff'"),
    ],
    ids=[
        "blank-suite",
        "repeat-0",
        "repeat-negative",
        "repeat-not-a-number",
        "repeat-over-the-bound",
        "concurrency-negative",
        "surrogate-model",
        "surrogate-feedback",
        "surrogate-replay",
        "surrogate-capture",
        "surrogate-shadow",
    ],
)
def test_keel_eval_refuses_bad_counts_and_unstorable_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    db = f"sqlite:///{tmp_path}/k.db"
    assert keel_main(["db", "setup", "--db", db]) == 0
    extra = ["--out", str(tmp_path / "out")] if argv[1] not in ("feedback", "capture") else []
    extra += ["--db", db] if argv[1] in ("feedback", "replay", "capture", "shadow") else []
    try:
        code = keel_main([*argv, *extra])
    except SystemExit as exited:  # argparse's usage error
        code = int(str(exited.code))
    assert code == 2
    assert says in capsys.readouterr().err


def test_keel_help_lists_eval(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        keel_main(["--help"])
    assert "run an eval suite" in capsys.readouterr().out


@pytest.mark.parametrize("case", suite_cases(builtin_suite("demo")))
async def test_a_suite_as_parametrized_tests(case: object) -> None:
    run = await check_case(builtin_suite("demo"), case)  # type: ignore[arg-type]
    assert run.passed


async def test_a_failing_case_fails_its_test_with_the_scores(tmp_path: Path) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text(MIXED)
    suite = load_suite(path)
    with pytest.raises(CaseFailed, match=r"case 'wrong' failed .*\n  outcome: "):
        await check_case(suite, suite.cases[1])
    assert [p.id for p in suite_cases(path)] == ["right", "wrong"]


def test_a_lone_surrogate_in_a_case_or_an_answer_is_printed_and_reported_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "odd.yaml"
    suite.write_text(
        'model: {script: ["ok \\ud800 done"]}\n'
        'cases: [{id: "a\\ud800", input: "hi \\udfff \\x01"}]',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert keel_main(["eval", str(suite), "--out", str(out)]) == 0
    assert "PASS a\\ud800 #0 success/completed" in capsys.readouterr().out
    for name in ("results.json", "results.md", "report.html"):
        assert "ud800" in (out / name).read_text(encoding="utf-8")


# -- --price: a model keel's table does not know, under the agents' dollar limits ----------------

HOUSE = "serve.house_model:demo"
"""keel's demo scenario under a name keel's price table does not know (`house-model`)."""


def _usd(run: dict[str, Any], price_in: float, price_out: float) -> float:
    usage = run["usage"]
    return (usage["input_tokens"] * price_in + usage["output_tokens"] * price_out) / 1_000_000


def test_keel_eval_on_an_unpriced_model_needs_price_and_spends_by_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo agent holds each run to $0.50: every case refused the unpriced model; --price
    prices it for the suite's factory, and the spend is counted at the price given."""
    argv = ["eval", "demo", "--model", HOUSE, "--out", str(tmp_path / "none")]
    assert keel_main(argv) == 1
    out = capsys.readouterr().out
    assert out.count("raised: UserError: keel has no price for model 'house-model'") == 2
    assert "--price house-model=IN,OUT for keel run, keel demo and keel eval" in out

    spent = {}
    for price in ("1,2", "3,6"):
        argv = ["eval", "demo", "--model", HOUSE, "--out", str(tmp_path / price)]
        assert keel_main([*argv, "--price", f"house-model={price}"]) == 0
        assert "demo: 2/2 passed" in capsys.readouterr().out
        runs = json.loads((tmp_path / price / "results.json").read_text())["runs"]
        assert [r["raised"] for r in runs] == [None, None]
        price_in, price_out = map(float, price.split(","))
        for run in runs:
            assert run["usage"]["usd"] == pytest.approx(_usd(run, price_in, price_out))
        spent[price] = sum(r["usage"]["usd"] for r in runs)
    assert spent["1,2"] > 0 and spent["3,6"] == pytest.approx(3 * spent["1,2"])


def test_a_free_price_is_a_price_not_usd_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A house model priced at $0 spends $0: the budgets score knows its price (--price), so
    the case's usd budget passes instead of failing as `usd unknown`."""
    argv = ["eval", "demo", "--model", HOUSE, "--out", str(tmp_path), "--price", "house-model=0,0"]
    assert keel_main(argv) == 0, capsys.readouterr().out
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    budgets = [s for r in runs for s in r["scores"] if s["name"] == "budgets"]
    assert budgets and all(s["passed"] for s in budgets) and runs[0]["usage"]["usd"] == 0


@pytest.mark.parametrize(
    "price", ["house-model=1", "=1,2", "house-model=nan,2", "house-model=-1,2", "house-model=1,x"]
)
@pytest.mark.parametrize(
    "command", [["demo"], ["shadow", "demo", "--candidate-model", "keel:demo"]]
)
def test_a_bad_price_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], price: str, command: list[str]
) -> None:
    out = tmp_path / "out"
    assert keel_main(["eval", *command, "--model", HOUSE, "--price", price, "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert f"--price {price!r}: give MODEL=INPUT,OUTPUT in USD per 1M tokens" in printed.err
    assert "PASS" not in printed.out and "FAIL" not in printed.out and not out.exists()


def plain_agent(model: BaseChatModel) -> Any:
    """A factory that takes no prices (as every factory did before --price)."""
    return demo_agent(model)


def test_price_for_a_factory_that_cannot_take_it_says_how_to_fix_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "demo", "--graph", "test_evals_cli:plain_agent", "--out", str(tmp_path)]
    assert keel_main([*argv, "--model", HOUSE, "--price", "house-model=1,2"]) == 2
    err = capsys.readouterr().err
    assert "the graph factory 'test_evals_cli:plain_agent' takes no `prices` argument" in err
    assert "Add `prices: PriceTable | None = None` to it" in err
    assert keel_main([*argv, "--model", "keel:demo"]) == 0  # without prices it is called as before


def test_every_builtin_factory_takes_prices() -> None:
    """The built-in suites' cases name their own factories (a failing ledger, a failing store):
    each must take the --price table, or `keel eval chaos --price ...` is refused."""
    from keel.evals import builtin
    from keel.evals.runner import check_prices
    from keel.pricing import PriceTable

    factories = [(n, getattr(builtin, n)) for n in builtin.__all__ if n.endswith("_agent")]
    assert len(factories) == 5
    check_prices(factories, PriceTable())
    graphs = {c.graph for name in builtin.BUILTIN_SUITES for c in builtin_suite(name).cases}
    assert graphs - {None} <= {f"keel.evals.builtin:{n}" for n, _ in factories}


def test_keel_eval_shadow_prices_both_sides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "shadow", "demo", "--model", HOUSE, "--candidate-model", "keel:demo"]
    argv += ["--out", str(tmp_path)]
    assert keel_main(argv) == 0  # the report is written; the unpriced side's runs all raised
    data = json.loads((tmp_path / "shadow.json").read_text())
    assert data["summary"]["baseline_pass_rate"] == 0.0
    capsys.readouterr()
    assert keel_main([*argv, "--price", "house-model=1,2"]) == 0
    data = json.loads((tmp_path / "shadow.json").read_text())
    assert data["summary"]["baseline_pass_rate"] == 1.0


def test_a_suite_file_holds_no_prices(tmp_path: Path) -> None:
    """README: a suite file holds no prices; --price is given where the suite runs (a `prices:`
    key is refused as unknown, not ignored)."""
    from keel.errors import UserError

    path = tmp_path / "priced.yaml"
    path.write_text(MIXED + "prices: {house-model: {input_per_mtok: 1, output_per_mtok: 2}}\n")
    with pytest.raises(UserError, match=r"unknown field\(s\) \['prices'\]"):
        load_suite(path)


_EMPTY_OPTIONS = {
    "--graph": "name a graph factory as module:factory, or leave --graph out for keel's demo agent",
    "--judge": "name the judge's model (e.g. openai:gpt-4o-mini), or leave --judge out",
    "--out": "name a folder for the results, or leave --out out for .keel/evals/SUITE",
}


@pytest.mark.parametrize("option", list(_EMPTY_OPTIONS))
def test_an_empty_graph_judge_or_out_is_refused_not_taken_for_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    """`--graph ""` ran the demo agent, `--judge ""` judged nothing and `--out ""` wrote to
    .keel/evals: each as if the option was not given (a variable that was not set, say)."""
    monkeypatch.chdir(tmp_path)
    assert keel_main(["eval", "demo", option, ""]) == 2
    assert capsys.readouterr().err == f"keel eval: {option} is empty: {_EMPTY_OPTIONS[option]}.\n"
    assert not (tmp_path / ".keel").exists()  # before any case ran
