"""Reports: Markdown and self-contained HTML through the CLI."""

from __future__ import annotations

import re

from click.testing import CliRunner

from reward_audit import compare
from reward_audit.cli import main
from reward_audit.report import meaning_lines, render_html, render_markdown
from synth import SynthRun


def leaky(folder):
    run = SynthRun()
    run.episode("e1", [{0: 1.0, 1: 10.0}, {0: 2.0, 1: 20.0}], {0: "p0", 1: "p1"})
    run.report("e1", "module", 13.0, module="p0")
    run.report("e1", "module", 30.0, module="p1")
    return run.write(str(folder))


def test_markdown_has_table_findings_and_meaning(tmp_path):
    md = render_markdown(compare(leaky(tmp_path)))
    assert "| train | module | `p0` | 1 | 3 | 13 | 10 | **LEAK** |" in md
    assert "agent 1's earlier-chunk rewards (+10)" in md
    assert "### What the numbers mean" in md


def test_html_is_self_contained(tmp_path):
    page = render_html(compare(leaky(tmp_path)))
    assert page.startswith("<!doctype html>")
    assert not re.search(r"(src|href)=['\"]https?://", page)
    assert "LEAK" in page and "agent 1&#x27;s earlier-chunk rewards" in page


def test_cli_report_writes_file_and_bad_output_exits_2(tmp_path):
    path = leaky(tmp_path / "run")
    out = tmp_path / "r.md"
    result = CliRunner().invoke(main, ["report", path, "--format", "md", "-o", str(out)])
    assert result.exit_code == 1, result.output  # a failing verdict: exit 1, as `compare`
    assert "1 failing findings" in result.output and out.read_text().startswith("## reward_audit")
    bad = CliRunner().invoke(main, ["report", path, "-o", str(tmp_path / "missing" / "r.html")])
    assert bad.exit_code == 2 and "cannot write the report" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_meaning_comes_from_the_recorded_adapter(tmp_path):
    run = SynthRun()
    run.episode("e", [{0: 1.0}], {0: "p0"})
    run.report("e", "agent", 1.0, agent=0)
    folder = run.write(
        str(tmp_path),
        smoothing_model="per_call_window",
        metrics_num_episodes_for_smoothing=100,
        iteration_semantics={"env_runners/module_episode_returns_mean/": "mean_of_episode_sums"},
    )
    text = "\n".join(meaning_lines(compare(folder)))
    assert "ceil(S / num_env_runners)" in text and "S = 100" in text
    assert "env_runners/module_episode_returns_mean/" in text and "per-episode sum" in text
