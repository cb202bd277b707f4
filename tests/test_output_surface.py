"""One output surface (issue 10): ``--format text|json|md|html`` on compare / report / demo,
one JSON document per invocation, ``--allow`` / ``--phase`` deciding exactly what
``assert_no_leakage`` decides, notebook reprs, and the HTML report without matplotlib.

Most cases run on fixtures/runs/ray212_newstack_leak, a real Ray 2.12 run: four training
policies LEAK (p1..p4), evaluation is clean (tests/test_fixtures.py reads it by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import reward_audit
from reward_audit import RewardLeakageError, assert_no_leakage, compare
from reward_audit.cli import main
from synth import SynthRun

RUN = os.path.join(os.path.dirname(__file__), "..", "fixtures", "runs", "ray212_newstack_leak")
LEAKING = ["p1", "p2", "p3", "p4"]  # train policy keys


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def document(result) -> dict:
    doc = json.loads(result.stdout)  # the whole of stdout: one document, nothing else
    assert doc["ok"] == (result.exit_code == 0), (doc["ok"], result.exit_code)
    return doc


# --------------------------------------------------------------------------- the JSON document


def test_compare_json_is_one_document_that_fails():
    result = cli("compare", RUN, "--format", "json")
    assert result.exit_code == 1
    doc = document(result)
    assert list(doc) == ["ok", "counts", "tool", "criteria", "runs"]
    assert doc["ok"] is False and doc["counts"] == {"CLEAN": 5, "LEAK": 4, "INCOMPLETE": 1}
    assert doc["tool"] == {"name": "reward_audit", "version": reward_audit.__version__}
    assert doc["criteria"] == {"fail_on": ["DROP", "LEAK", "MISMATCH"], "allow": [], "phases": None, "allow_unverified": False}
    [run] = doc["runs"]
    assert (run["name"], run["ray_version"], run["api_stack"], run["ok"]) == ("ray212_newstack_leak", "2.12.0", "new", False)
    assert {"run", "adapter", "counts", "findings", "dashboards", "notes", "nothing_verified"} <= set(run)
    failing = sorted((f["phase"], f["kind"], f["key"]) for f in run["findings"] if f["failing"])
    assert failing == [("train", "policy", p) for p in LEAKING]
    assert all(f["verdict"] == "LEAK" for f in run["findings"] if f["failing"])
    assert run["nothing_verified"] == [] and run["dashboards"] and run["notes"]
    off = [d for d in run["dashboards"] if d["path"] == "policy_reward_mean/p1"]
    assert off and off[0]["wrong_iterations"] == [1, 2]


def test_json_flag_is_an_alias_and_conflicts_are_usage_errors():
    assert cli("compare", RUN, "--json").stdout == cli("compare", RUN, "--format", "json").stdout
    both = cli("compare", RUN, "--json", "--format", "md")
    assert both.exit_code == 2 and "`--json` means `--format json`" in both.output


@pytest.mark.parametrize("form", ["policy:{}", "train:policy:{}"])
def test_allowing_every_failing_key_passes(form):
    allow = [a for p in LEAKING for a in ("--allow", form.format(p))]
    result = cli("compare", RUN, "--format", "json", *allow)
    assert result.exit_code == 0, result.output
    doc = document(result)
    assert doc["ok"] is True and doc["runs"][0]["ok"] is True
    assert not any(f["failing"] for f in doc["runs"][0]["findings"])
    assert doc["criteria"]["allow"] == [form.format(p) for p in LEAKING]
    text = cli("compare", RUN, *allow)
    assert text.exit_code == 0 and text.stdout.rstrip().endswith("5 CLEAN, 4 LEAK, 1 INCOMPLETE — no failures (4 allowed)")


def test_allowing_some_keys_still_fails_on_the_others():
    result = cli("compare", RUN, "--format", "json", "--allow", "policy:p1", "--allow", "evaluation:policy:p2")
    assert result.exit_code == 1
    failing = {f["key"] for f in document(result)["runs"][0]["findings"] if f["failing"]}
    assert failing == {"p2", "p3", "p4"}  # evaluation:policy:p2 does not name train's p2


def test_phase_limits_the_check():
    result = cli("compare", RUN, "--format", "json", "--phase", "evaluation")
    assert result.exit_code == 0
    doc = document(result)
    assert doc["criteria"]["phases"] == ["evaluation"] and doc["counts"]["LEAK"] == 4  # shown, not failing
    assert cli("compare", RUN, "--phase", "train").exit_code == 1
    assert cli("compare", RUN, "--phase", "train", "--phase", "evaluation").exit_code == 1
    text = cli("compare", RUN, "--phase", "evaluation")
    assert text.stdout.rstrip().endswith("— no failures (4 in phases not checked)")
    assert cli("compare", RUN, "--phase", "eval").exit_code == 2  # a typo never checks nothing


def test_a_checked_phase_the_run_lacks_fails_closed(tmp_path):
    run = SynthRun()
    run.episode("e", [{0: 1.0}], {0: "p0"})
    run.report("e", "agent", 1.0, agent=0)
    path = run.write(str(tmp_path))
    result = cli("compare", path, "--format", "json", "--phase", "evaluation")
    assert result.exit_code == 1
    [u] = document(result)["runs"][0]["nothing_verified"]
    assert (u["phase"], u["failing"]) == ("evaluation", True) and "recorded nothing in this phase" in u["reason"]
    assert cli("compare", path, "--phase", "evaluation", "--allow-unverified").exit_code == 0
    assert cli("compare", path, "--phase", "train").exit_code == 0
    with pytest.raises(RewardLeakageError, match="nothing verified in phase evaluation"):
        assert_no_leakage(path, phases=["evaluation"])


@pytest.mark.parametrize(
    "allow, phases, fail_on",
    [
        ((), None, None),
        (("policy:p1",), None, None),
        (tuple(f"policy:{p}" for p in LEAKING), None, None),
        (tuple(f"train:policy:{p}" for p in LEAKING[:3]), None, None),
        ((), ("evaluation",), None),
        ((), ("train",), None),
        (("policy:p1", "policy:p2"), ("train",), None),
        ((), None, "drop"),
        ((), None, "incomplete"),
        (tuple(f"policy:{p}" for p in LEAKING), None, "leak,incomplete"),
        (tuple(f"policy:{p}" for p in LEAKING) + ("episode:unreported",), None, "leak,incomplete"),
    ],
)
def test_cli_and_assert_no_leakage_decide_alike(allow, phases, fail_on):
    args = [a for x in allow for a in ("--allow", x)] + [a for p in phases or () for a in ("--phase", p)]
    args += ["--fail-on", fail_on] if fail_on else []
    result = cli("compare", RUN, "--format", "json", *args)
    assert result.exit_code in (0, 1), result.output
    doc = document(result)
    kwargs = {"fail_on": fail_on.split(",")} if fail_on else {}
    try:
        assert_no_leakage(RUN, allow=allow, phases=phases, **kwargs)
        passed, failing = True, []
    except RewardLeakageError as e:
        passed, failing = False, e.findings
    assert passed == doc["ok"] == (result.exit_code == 0)
    assert sorted((f.phase, f.kind, f.key) for f in failing) == sorted(
        (f["phase"], f["kind"], f["key"]) for f in doc["runs"][0]["findings"] if f["failing"]
    )


@pytest.mark.parametrize("bad", ["p1", "policy:", "train:p1", "agnet:0"])
def test_a_malformed_allow_is_refused(bad):
    result = cli("compare", RUN, "--allow", bad)
    assert result.exit_code == 2 and "`kind:key` or `phase:kind:key`" in result.output
    with pytest.raises(ValueError, match="`kind:key` or `phase:kind:key`"):
        assert_no_leakage(RUN, allow=[bad])


def test_an_allow_that_names_nothing_is_a_warning_on_stderr():
    result = cli("compare", RUN, "--format", "json", "--allow", "module:nobody", "--phase", "evaluation")
    assert result.exit_code == 0
    assert "`--allow module:nobody` names no finding" in result.stderr
    document(result)  # stdout stays one document


# --------------------------------------------------------------------------- md / html / text anywhere


def test_compare_writes_markdown_and_html_to_stdout():
    md = cli("compare", RUN, "--format", "md")
    assert md.exit_code == 1 and md.stdout.startswith("## reward_audit: ray212_newstack_leak")
    assert "| train | policy | `p1` | 12 |" in md.stdout and "— 4 failing" in md.stdout
    page = cli("compare", RUN, "--format", "html")
    assert page.exit_code == 1 and page.stdout.startswith("<!doctype html>") and page.stdout.rstrip().endswith("</html>")
    allowed = cli("compare", RUN, "--format", "md", "--phase", "evaluation")
    assert allowed.exit_code == 0 and "no failures (4 in phases not checked)" in allowed.stdout


def test_report_json_and_text_to_stdout():
    result = cli("report", RUN, "--format", "json", "-o", "-")
    assert result.exit_code == 1
    doc = document(result)
    assert doc["runs"][0]["name"] == "ray212_newstack_leak"
    assert doc == document(cli("compare", RUN, "--format", "json"))
    text = cli("report", RUN, "--format", "text", "-o", "-")
    assert text.exit_code == 1 and "LEAK       train policy p1" in text.stdout
    assert "episode db3f736daa464b4ea4af48561da230a1" in text.stdout  # the evidence, as --verbose


@pytest.mark.parametrize("fmt, name", [("html", "report.html"), ("md", "report.md"), ("json", "report.json"), ("text", "report.txt")])
def test_report_default_file_follows_the_format(tmp_path, fmt, name):
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        result = runner.invoke(main, ["report", os.path.abspath(RUN), "--format", fmt, "--allow", "policy:p1"])
        assert result.exit_code == 1 and f"wrote {name} (1 run, 3 failing findings)" in result.output
        assert os.path.getsize(name) > 0


# --------------------------------------------------------------------------- notebooks


def test_audit_repr_is_one_short_line():
    audit = compare(RUN)
    text = repr(audit)
    assert text == "<Audit 'ray212_newstack_leak': 5 CLEAN, 4 LEAK, 1 INCOMPLETE — ok=False>"
    finding = next(f for f in audit.findings if f.key == "p1" and f.phase == "train")
    assert "\n" not in repr(finding) and len(repr(finding)) < 200
    assert repr(finding).startswith("<Finding train policy 'p1': LEAK, 12 episodes, truth 29.8841, reported 228.013")
    assert "\n" not in repr(finding.evidence[0]) and len(repr(finding.evidence[0])) < 400


def test_repr_html_is_escaped_and_has_no_plots(tmp_path):
    hostile = "<script>alert(1)</script>"
    run = SynthRun()
    run.episode("e1", [{0: 1.0, 1: 10.0}, {0: 2.0, 1: 20.0}], {0: hostile, 1: "p1"})
    run.report("e1", "module", 13.0, module=hostile)
    run.report("e1", "module", 30.0, module="p1")
    page = compare(run.write(str(tmp_path)))._repr_html_()
    assert page.startswith("<div class='reward-audit'>") and page.endswith("</div>")
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img" not in page and "LEAK" in page
    assert "<img" not in compare(RUN)._repr_html_()


def test_dashboard_frame_is_one_long_table():
    audit = compare(RUN)
    frame = audit.dashboard_frame()
    assert list(frame.columns) == [
        "phase", "path", "kind", "key", "iteration", "displayed", "rebuilt", "expected", "low", "high", "difference", "model_ok", "agrees", "status",
    ]
    assert len(frame) == sum(len(d.table) for d in audit.dashboard) > 0
    assert set(frame["status"]) <= {"match", "off", "bounded"}
    p1 = frame[(frame["phase"] == "train") & (frame["path"] == "policy_reward_mean/p1")]
    assert p1["status"].tolist() == ["off", "off"] and p1["iteration"].tolist() == [1, 2]
    assert (frame.loc[frame["status"] == "off", "difference"].abs() > 0).all()
    assert (frame[frame["phase"] == "evaluation"]["status"] == "match").all()


def test_dashboard_frame_of_a_run_without_dashboards(tmp_path):
    run = SynthRun()
    run.episode("e", [{0: 1.0}], {0: "p0"})
    run.report("e", "agent", 1.0, agent=0)
    frame = compare(run.write(str(tmp_path))).dashboard_frame()
    assert frame.empty and "status" in frame.columns


# --------------------------------------------------------------------------- without matplotlib

WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # `import matplotlib` raises ImportError, as when it is not installed
from reward_audit.cli import main
main([sys.argv[1], sys.argv[2], "--format", "html", "-o", sys.argv[3]])
"""


def test_html_report_without_matplotlib(tmp_path):
    out = tmp_path / "report.html"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, "report", RUN, str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr  # a LEAK: exit 1, not 2 (could not audit)
    assert "Traceback" not in proc.stderr
    page = out.read_text(encoding="utf-8")
    assert "<img" not in page and page.count("Plots need matplotlib") == 1
    assert "pip install &quot;reward_audit[report]&quot;" in page
    assert "<h3>Verdicts</h3>" in page and "policy_reward_mean/p1: off in 2/2 iterations" in page
