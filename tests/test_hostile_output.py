"""Hostile ids and hostile output paths: every output escapes the data, and ``report -o``
never destroys anything.

Hostile run folders are the recorded Ray 2.12 fixture (LEAK) with policy ``p1`` renamed,
agent ``1`` renamed, and a prefix / suffix added to every episode and runner id — in every
table, so the audit is the same as the fixture's.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from reward_audit import compare
from reward_audit.cli import main
from reward_audit.report import md_code, render_markdown, render_text, visible
from synth import SynthRun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "fixtures", "runs", "ray212_newstack_leak")

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "a|b", "a`b", "a\nb", "\x1b[31mred", "sh$\\foo{$"]
FORGED = "3 CLEAN — no failures"


def hostile_run(dest, *, module: str = "p1", agent: str = "1", episode_prefix: str = "", runner_suffix: str = "") -> str:
    """A copy of the 2.12 fixture at ``dest`` (a trial dir) with the ids rewritten."""
    shutil.copytree(FIXTURE, dest)
    audit = os.path.join(dest, "reward_audit")

    def rename(column: pa.ChunkedArray, old: str, new: str) -> pa.ChunkedArray:
        return pc.if_else(pc.equal(column, old), pa.scalar(new, column.type), column)

    for file in glob.glob(os.path.join(audit, "*", "*.parquet")):
        table = pq.read_table(file)
        columns = {name: table[name] for name in table.column_names}
        for name in ("module_id", "key"):
            if name in columns:
                columns[name] = rename(columns[name], "p1", module)
        if "path" in columns:
            columns["path"] = pc.replace_substring_regex(columns["path"], "/p1$", "/" + module.replace("\\", "\\\\"))
        if "agent_id" in columns:
            columns["agent_id"] = rename(columns["agent_id"], "1", agent)
        if "agent_id_type" in columns:
            columns["agent_id_type"] = pc.if_else(pc.is_valid(columns["agent_id_type"]), pa.scalar("str"), columns["agent_id_type"])
        if "episode_id" in columns:
            columns["episode_id"] = pc.binary_join_element_wise(episode_prefix, columns["episode_id"], "")
        if "runner_id" in columns:
            columns["runner_id"] = pc.binary_join_element_wise(columns["runner_id"], runner_suffix, "")
        pq.write_table(pa.table(columns, schema=table.schema), file)
    manifest_file = os.path.join(audit, "run.json")
    with open(manifest_file) as f:
        manifest = json.load(f)
    manifest["policies"] = [module if p == "p1" else p for p in manifest["policies"]]
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)
    return str(dest)


def everywhere(dest, hostile: str) -> str:
    """The hostile string as module id, agent id, in every episode id and runner id."""
    return hostile_run(dest, module=hostile, agent=hostile, episode_prefix=hostile, runner_suffix=hostile)


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def unescaped_pipes(line: str) -> int:
    """Markdown table delimiters: pipes after an even number of backslashes."""
    return len(re.findall(r"(?<!\\)(?:\\\\)*\|", line))


def unescaped_backticks(line: str) -> int:
    return len(re.findall(r"(?<!\\)(?:\\\\)*`", line))


def test_the_hostile_fixture_audits_like_the_original(tmp_path):
    run = everywhere(tmp_path / "t", HOSTILE[0])
    assert compare(run).counts() == compare(FIXTURE).counts() == {"LEAK": 4, "CLEAN": 5, "INCOMPLETE": 1}


# --------------------------------------------------------------------------- Markdown


@pytest.mark.parametrize("hostile", HOSTILE)
def test_markdown_escapes_hostile_ids(tmp_path, hostile):
    run = everywhere(tmp_path / "t", hostile)
    result = invoke("report", run, "--format", "md", "-o", "-")
    assert result.exit_code == 1, result.output
    md = result.stdout
    assert "<script" not in md and "<img" not in md and "\x1b" not in md
    lines = md.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 10  # header, rule, one row per finding: no row split or injected
    assert all(unescaped_pipes(line) == 9 for line in table), table
    assert all(unescaped_backticks(line) % 2 == 0 for line in lines), "a code span is broken"
    assert not any(line.startswith("b") for line in lines)  # "a\nb" never starts a line
    assert any(md_code(hostile) in line and "**LEAK**" in line for line in table)


def test_markdown_newline_in_an_id_never_forges_a_line(tmp_path):
    run = everywhere(tmp_path / "t", f"x\n{FORGED}")
    md = render_markdown(compare(run))
    assert not any(line.lstrip("-| ").startswith(FORGED) for line in md.splitlines())
    assert "x\\\\n3 CLEAN — no failures" in md  # shown as `x\n3 CLEAN…`


def test_markdown_code_span_survives_a_backtick(tmp_path):
    md = render_markdown(compare(hostile_run(tmp_path / "t", module="a`b")))
    assert "| train | policy | <code>a\\`b</code> | 12 |" in md


# --------------------------------------------------------------------------- terminal


@pytest.mark.parametrize("hostile", HOSTILE)
def test_terminal_escapes_hostile_ids(tmp_path, hostile):
    run = everywhere(tmp_path / "t", hostile)
    result = invoke("compare", run, "--verbose")
    assert result.exit_code == 1
    out = result.output
    assert "\x1b" not in out and "\t" not in out and "\r" not in out
    assert f"train       policy   {visible(hostile)}" in out  # one table row, shown visibly
    assert not any(line.startswith("b ") or line.startswith("b)") for line in out.splitlines())


@pytest.mark.parametrize("where", ["module", "agent", "episode_prefix", "runner_suffix", "trial folder"])
def test_a_newline_in_an_id_or_path_never_forges_a_terminal_line(tmp_path, where):
    hostile = f"x\n{FORGED}"
    if where == "trial folder":
        run = hostile_run(tmp_path / hostile)
    else:
        run = hostile_run(tmp_path / "t", **{where: hostile})
    for args in ([], ["--verbose"]):
        out = invoke("compare", run, *args).output
        assert not any(line.startswith(FORGED) for line in out.splitlines()), out
        assert out.rstrip().endswith("4 failing")
    assert not any(line.startswith(FORGED) for line in render_text(compare(run), verbose=True).splitlines())


def test_visible_shows_control_characters_as_escapes():
    assert visible("a\nb\tc\x1b[31m\u202e\x00") == "a\\nb\\tc\\x1b[31m\\u202e\\x00"
    assert visible("sh$\\foo{$ é —") == "sh$\\foo{$ é —"


def test_an_error_message_stays_one_line(tmp_path):
    result = invoke("compare", str(tmp_path / f"missing\n{FORGED}"))
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "\\n3 CLEAN" in result.output


# --------------------------------------------------------------------------- HTML and plots


@pytest.mark.parametrize("hostile", HOSTILE)
def test_html_report_escapes_and_plots_hostile_ids(tmp_path, hostile):
    """`sh$\\foo{$` used to fail the report: matplotlib parsed the plot title as mathtext."""
    run = everywhere(tmp_path / "t", hostile)
    out = tmp_path / "report.html"
    result = invoke("report", run, "-o", out)
    assert result.exit_code == 1, result.output  # a LEAK: 1, never 2 (could not audit)
    page = out.read_text(encoding="utf-8")
    assert "<script>alert" not in page and "<img src=x" not in page and "\x1b" not in page
    assert page.count("data:image/png;base64,") >= 4
    assert page.count("<!doctype html>") == 1


def test_plot_title_with_dollars_is_not_mathtext(tmp_path):
    result = invoke("report", hostile_run(tmp_path / "t", module="sh$\\foo{$"), "-o", tmp_path / "r.html")
    assert result.exit_code == 1, result.output
    assert "sh$\\foo{$" in (tmp_path / "r.html").read_text(encoding="utf-8")  # alt text and captions


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("hostile", HOSTILE)
def test_json_stays_valid_and_keeps_the_ids(tmp_path, hostile):
    run = everywhere(tmp_path / "t", hostile)
    result = invoke("compare", run, "--json")
    assert result.exit_code == 1
    assert "\x1b" not in result.stdout and "\n" not in "".join(re.findall(r'"[^"\n]*"', result.stdout))
    findings = [f for run in json.loads(result.stdout)["runs"] for f in run["findings"]]
    assert hostile in {f["key"] for f in findings}
    evidence = [e for f in findings for e in f["evidence"]]
    assert evidence and all(e["episode_id"].startswith(hostile) and e["runner_id"].endswith(hostile) for e in evidence)


# --------------------------------------------------------------------------- report -o


def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert all(w in lines[0] for w in words), lines[0]


def test_report_refuses_an_existing_file_unless_force(tmp_path):
    run = hostile_run(tmp_path / "t")
    out = tmp_path / "report.html"
    out.write_text("keep me")
    one_line_error(invoke("report", run, "-o", out), str(out), "already exists", "`--force`")
    assert out.read_text() == "keep me"
    result = invoke("report", run, "-o", out, "--force")
    assert result.exit_code == 1 and out.read_text(encoding="utf-8").startswith("<!doctype html>")


def test_report_refuses_a_symlink_even_with_force(tmp_path):
    run = hostile_run(tmp_path / "t")
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "report.html"
    link.symlink_to(target)
    for extra in ([], ["--force"]):
        one_line_error(invoke("report", run, "-o", link, *extra), str(link), "symlink", "`-o`")
    assert target.read_text() == "keep me" and link.is_symlink()
    dangling = tmp_path / "dangling.md"
    dangling.symlink_to(tmp_path / "nowhere.md")
    one_line_error(invoke("report", run, "--format", "md", "-o", dangling), "symlink")
    assert not (tmp_path / "nowhere.md").exists()


@pytest.mark.parametrize("inside", ["reward_audit/run.json", "reward_audit/report.html", "reward_audit/raw_rewards/part-x.parquet", "reward_audit/raw_rewards"])
def test_report_never_writes_inside_the_audited_run(tmp_path, inside):
    run = hostile_run(tmp_path / "t")
    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(run, "reward_audit", "**", "*"), recursive=True) if os.path.isfile(p)}
    out = os.path.join(run, inside)
    for extra in ([], ["--force"]):
        one_line_error(invoke("report", run, "-o", out, *extra), "inside the audited run folder", "`-o")
    # also when the experiment dir above it is audited
    one_line_error(invoke("report", tmp_path, "-o", out, "--force"), "inside the audited run folder")
    after = {p: open(p, "rb").read() for p in glob.glob(os.path.join(run, "reward_audit", "**", "*"), recursive=True) if os.path.isfile(p)}
    assert after == before


def test_report_to_stdout(tmp_path):
    result = invoke("report", hostile_run(tmp_path / "t"), "--format", "md", "-o", "-")
    assert result.exit_code == 1
    assert result.stdout.startswith("## reward_audit: t\n") and "wrote" not in result.output
    assert not os.path.exists("-")


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    run = hostile_run(tmp_path / "t")
    out = tmp_path / "out" / "report.md"
    out.parent.mkdir()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    one_line_error(invoke("report", run, "--format", "md", "-o", out), "cannot write the report", "No space left")
    assert os.listdir(out.parent) == []


def test_report_exit_code_is_compare_s(tmp_path):
    run = hostile_run(tmp_path / "t")
    assert invoke("report", run, "-o", tmp_path / "a.md", "--format", "md").exit_code == 1  # LEAK
    assert invoke("compare", run).exit_code == 1
    assert invoke("report", run, "-o", tmp_path / "b.md", "--format", "md", "--fail-on", "excluded").exit_code == 0
    assert invoke("report", run, "-o", tmp_path / "c.md", "--format", "md", "--fail-on", "incomplete").exit_code == 1
    # nothing verified: fails unless allowed, like compare
    synth = SynthRun()
    synth.episode("e", [{0: 1.0}], {0: "p0"})
    empty = synth.write(str(tmp_path / "empty"))
    assert invoke("report", empty, "-o", tmp_path / "d.md", "--format", "md").exit_code == 1
    assert "NOTHING VERIFIED" in (tmp_path / "d.md").read_text(encoding="utf-8")
    assert invoke("report", empty, "-o", tmp_path / "e.md", "--format", "md", "--allow-unverified").exit_code == 0


def test_two_trials_make_one_document(tmp_path):
    experiment = tmp_path / "exp"
    hostile_run(experiment / "trial_a")
    hostile_run(experiment / "trial_b", module="<b>bold</b>")
    page_file, md_file = tmp_path / "r.html", tmp_path / "r.md"
    assert invoke("report", experiment, "-o", page_file).exit_code == 1
    page = page_file.read_text(encoding="utf-8")
    assert page.count("<!doctype html>") == 1 and page.count("</html>") == 1
    assert page.count("<section id=") == 2 and "<h2>trial_a</h2>" in page and "<h2>trial_b</h2>" in page
    assert "<b>bold" not in page
    assert invoke("report", experiment, "--format", "md", "-o", md_file).exit_code == 1
    md = md_file.read_text(encoding="utf-8")
    assert md.startswith("# reward_audit: 2 runs\n")
    assert md.count("\n## reward_audit: trial_a\n") == 1 and md.count("\n## reward_audit: trial_b\n") == 1


# --------------------------------------------------------------------------- locale


def locale_env(**extra: str) -> dict[str, str]:
    """``LC_ALL=C`` with Python's UTF-8 mode off: the locale encoding is ASCII."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8", "LANG", "LC_CTYPE")}
    return {**env, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]), **extra}


CLI = [sys.executable, "-m", "reward_audit.cli"]


def test_report_writes_utf8_under_lc_all_c(tmp_path):
    """The report used to be written in the locale's encoding: `UnicodeEncodeError` on `—`."""
    run = hostile_run(tmp_path / "t", module="é—≈")
    out = tmp_path / "r.md"
    report = subprocess.run([*CLI, "report", run, "--format", "md", "-o", str(out)], env=locale_env(), capture_output=True, timeout=120)
    assert report.returncode == 1, report.stderr
    assert "é—≈" in out.read_text(encoding="utf-8")
    for args in (["report", run, "--format", "md", "-o", "-"], ["compare", run, "--verbose"]):
        done = subprocess.run([*CLI, *args], env=locale_env(), capture_output=True, timeout=120)
        assert done.returncode == 1 and not done.stderr, done.stderr
        assert "é—≈" in done.stdout.decode("utf-8")  # click writes UTF-8 where the locale says ASCII


def test_terminal_that_cannot_encode_gets_escapes_not_a_crash(tmp_path):
    """A terminal in a narrow encoding (latin-1): `—` and `≈` become `\\u2014`, `\\u2248`."""
    run = hostile_run(tmp_path / "t", module="é—≈")
    done = subprocess.run([*CLI, "compare", run], env=locale_env(PYTHONIOENCODING="latin-1"), capture_output=True, timeout=120)
    assert done.returncode == 1, done.stderr
    stdout = done.stdout.decode("latin-1")
    assert "é\\u2014\\u2248" in stdout and stdout.rstrip().endswith("\\u2014 4 failing")
