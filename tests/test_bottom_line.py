"""The bottom line (bottom_line.py) in every output: the JSON run object, Markdown, HTML,
the notebook reprs. No Ray: one hand-written 2-chunk episode.

The env paid agent 0 (module p0) 1 + 2 = 3 and agent 1 (module p1) 10 + 20 = 30. RLlib
reports p0 = 3 and p1 = 30 (right) or p1 = 31 (a metrics LEAK). The training batches are
right, or agent 0's second-chunk 2 went into p1's batch (p1 trained on 32: LEAK; p0 and
agent 0 on 1: DROP; agent 1's value 32: LEAK).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from synth import SynthRun

from reward_audit import compare
from reward_audit.audit import Audit, Finding, Verdict
from reward_audit.bottom_line import BottomLine
from reward_audit.cli import main
from reward_audit.report import bottom_line, render_html, render_markdown

RIGHT = [(0, 0, "p0", 1.0), (0, 1, "p1", 10.0), (1, 0, "p0", 2.0), (1, 1, "p1", 20.0)]
MOVED = [(0, 0, "p0", 1.0), (0, 1, "p1", 10.0), (1, 1, "p1", 22.0)]  # agent 0's 2 in p1's batch
LEARNING_KEYS = ["learning:module:p0", "learning:module:p1", "learning:agent:0", "learning:agent:1"]


def record(tmp_path, *, p1: float = 30.0, trained: list | None = RIGHT) -> str:
    run = SynthRun()
    run.episode("e1", [{0: 1.0, 1: 10.0}, {0: 2.0, 1: 20.0}], {0: "p0", 1: "p1"})
    run.report("e1", "module", 3.0, module="p0")
    run.report("e1", "module", p1, module="p1")
    for chunk, agent, module, reward in trained or ():
        run.trained("e1", chunk, agent, module, reward)
    return run.write(str(tmp_path / "reward_audit"))  # a trial dir holds it


def side(verdict: str | None, wrong: bool, failing: bool, phases=("train", "evaluation")) -> dict:
    return {"phases": list(phases), "verdict": verdict, "wrong": wrong, "failing": failing}


def batches(verdict: str | None, wrong: bool, failing: bool) -> dict:
    return side(verdict, wrong, failing, phases=["learning"])


def json_run(folder: str, *args: str) -> tuple[dict, int]:
    result = CliRunner().invoke(main, ["compare", folder, "--format", "json", *args])
    doc = json.loads(result.stdout)
    assert doc["ok"] == (result.exit_code == 0)
    [run] = doc["runs"]
    return run, result.exit_code


CASES = {  # name: (record(...) arguments, metrics side, training-batches side, text after "— ")
    "both right": (
        {}, side("CLEAN", False, False), batches("CLEAN", False, False),
        "metrics: CLEAN · training batches: CLEAN — the reported numbers and the training data both match what the env paid",
    ),
    "batches wrong": (
        {"trained": MOVED}, side("CLEAN", False, False), batches("LEAK", True, True),
        "metrics: CLEAN · training batches: LEAK — the policies were trained on wrong rewards, though the reported numbers look right",
    ),
    "metrics wrong": (
        {"p1": 31.0}, side("LEAK", True, True), batches("CLEAN", False, False),
        "metrics: LEAK · training batches: CLEAN — the policies were trained on the right rewards; only the reported numbers are wrong",
    ),
    "both wrong": (
        {"p1": 31.0, "trained": MOVED}, side("LEAK", True, True), batches("LEAK", True, True),
        "metrics: LEAK · training batches: LEAK — both the reported numbers and the training data are wrong",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_json_bottom_line_is_structured(tmp_path, name):
    kwargs, metrics, trained, text = CASES[name]
    run, code = json_run(record(tmp_path, **kwargs))
    assert run["bottom_line"] == {"metrics": metrics, "training_batches": trained, "text": text}
    assert code == (1 if metrics["failing"] or trained["failing"] else 0)
    assert list(run).index("bottom_line") == list(run).index("counts") + 1  # near the top
    assert bottom_line(compare(record(tmp_path / "again", **kwargs))) == text  # the text report's function


def test_json_bottom_line_is_null_without_training_batches(tmp_path):
    run, code = json_run(record(tmp_path, trained=None))
    assert code == 0 and run["bottom_line"] is None and "bottom_line" in run


@pytest.mark.parametrize(
    "args, trained_failing, metrics_failing, code",
    [
        ((), True, False, 1),
        (("--phase", "learning"), True, False, 1),
        (("--phase", "train"), False, False, 0),  # learning findings shown, never failing
        (tuple(a for k in LEARNING_KEYS for a in ("--allow", k)), False, False, 0),
        (("--allow", "learning:module:p1", "--allow", "learning:agent:1"), True, False, 1),  # the DROPs of p0 / agent 0 still fail
        (("--fail-on", "leak", "--allow", "learning:module:p1", "--allow", "learning:agent:1"), False, False, 0),
    ],
)
def test_json_failing_follows_the_criteria_and_wrong_does_not(tmp_path, args, trained_failing, metrics_failing, code):
    run, exit_code = json_run(record(tmp_path, trained=MOVED), *args)
    line = run["bottom_line"]
    assert line["training_batches"] == batches("LEAK", True, trained_failing)  # what was found stays
    assert line["metrics"] == side("CLEAN", False, metrics_failing)
    assert exit_code == code and run["ok"] is (code == 0)


def test_markdown_shows_the_bottom_line_under_the_summary(tmp_path):
    md = render_markdown(compare(record(tmp_path, trained=MOVED)))
    lines = md.splitlines()
    at = lines.index(
        "> **Bottom line:** metrics: CLEAN · training batches: LEAK — the policies were trained on wrong rewards, though the reported numbers look right"
    )
    assert lines[at - 2] == "**2 CLEAN, 2 LEAK, 2 DROP — 4 failing**"
    assert at < lines.index("| phase | kind | key | episodes | truth | reported | diff | verdict |")
    assert "Bottom line" not in render_markdown(compare(record(tmp_path / "plain", trained=None)))


def test_html_shows_the_bottom_line_before_the_verdicts(tmp_path):
    page = render_html(compare(record(tmp_path, p1=31.0)))
    line = (
        "<p class=bottom-line><b>Bottom line:</b> metrics: LEAK · training batches: CLEAN — "
        "the policies were trained on the right rewards; only the reported numbers are wrong</p>"
    )
    assert page.count(line) == 1
    assert page.index("<b>5 CLEAN, 1 LEAK — 1 failing</b>") < page.index(line) < page.index("<h3>Verdicts</h3>")
    assert "bottom-line" not in render_html(compare(record(tmp_path / "plain", trained=None))).split("</style>")[1]


def test_each_run_of_a_multi_run_document_has_its_own(tmp_path):
    audits = [compare(record(tmp_path / "a", trained=MOVED)), compare(record(tmp_path / "b", trained=None))]
    assert render_markdown(audits).count("> **Bottom line:** metrics: CLEAN · training batches: LEAK") == 1
    doc = json.loads(CliRunner().invoke(main, ["compare", str(tmp_path), "--format", "json"]).stdout)
    assert sorted(str(r["bottom_line"] and r["bottom_line"]["training_batches"]["verdict"]) for r in doc["runs"]) == ["LEAK", "None"]


def test_notebook_reprs_show_it(tmp_path):
    audit = compare(record(tmp_path, trained=MOVED))
    assert repr(audit) == f"<Audit {audit.name!r}: 2 CLEAN, 2 LEAK, 2 DROP; metrics: CLEAN · training batches: LEAK — ok=False>"
    assert "<p class=bottom-line><b>Bottom line:</b> metrics: CLEAN · training batches: LEAK — " in audit._repr_html_()
    plain = compare(record(tmp_path / "plain", trained=None))
    assert repr(plain) == f"<Audit {plain.name!r}: 2 CLEAN — ok=True>"


# --------------------------------------------------------------------------- one side not judged


def finding(phase: str, verdict: Verdict) -> Finding:
    return Finding(phase, "module", "p0", verdict, 1, 1.0, 1.0, 0.0, "")


@pytest.mark.parametrize(
    "metrics, learning, verdicts, text",
    [
        ([], [Verdict.CLEAN], (None, "CLEAN"), "metrics: not recorded · training batches: CLEAN"),
        ([Verdict.INCOMPLETE], [Verdict.DROP], ("INCOMPLETE", "DROP"), "metrics: INCOMPLETE · training batches: DROP — the policies were trained on wrong rewards"),
        ([Verdict.MISMATCH, Verdict.LEAK], [Verdict.UNVERIFIED, Verdict.INCOMPLETE], ("LEAK", "UNVERIFIED"),
         "metrics: LEAK · training batches: UNVERIFIED — the reported numbers are wrong"),
        ([Verdict.EXCLUDED, Verdict.CLEAN], [Verdict.EXCLUDED, Verdict.CLEAN], ("CLEAN", "CLEAN"),
         "metrics: CLEAN · training batches: CLEAN — the reported numbers and the training data both match what the env paid"),
    ],
)
def test_unjudged_side_says_only_what_is_known(metrics, learning, verdicts, text):
    audit = Audit("p", "r", {}, tuple(finding("train", v) for v in metrics) + tuple(finding("learning", v) for v in learning))
    line = BottomLine.of(audit)
    assert line.text == text
    got = line.to_dict()
    assert (got["metrics"]["verdict"], got["training_batches"]["verdict"]) == verdicts
