"""The CLI through click's CliRunner: exit codes, the JSON document, one-line errors.
The output surface (--format, --allow, --phase) on a real recorded run: test_output_surface.py."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from reward_audit.cli import main
from synth import SynthRun


def clean_run(folder) -> str:
    run = SynthRun()
    run.episode("e1", [{0: 1.0, 1: 10.0}, {0: 2.0, 1: 20.0}], {0: "p0", 1: "p1"})
    run.report("e1", "module", 3.0, module="p0")
    run.report("e1", "module", 30.0, module="p1")
    return run.write(str(folder))


def leaky_run(folder) -> str:
    run = SynthRun()
    run.episode("e1", [{0: 1.0, 1: 10.0}, {0: 2.0, 1: 20.0}], {0: "p0", 1: "p1"})
    run.report("e1", "module", 3.0 + 10.0, module="p0")
    run.report("e1", "module", 30.0, module="p1")
    return run.write(str(folder))


def invoke(*args):
    result = CliRunner().invoke(main, list(args))
    return result


def test_clean_run_exits_0_with_table(tmp_path):
    result = invoke("compare", clean_run(tmp_path / "trial" / "reward_audit"))
    assert result.exit_code == 0, result.output
    assert "train  module  p0          1      3         3     0  CLEAN" in result.output
    assert result.output.rstrip().endswith("no failures")


def test_trial_dir_and_experiment_dir_are_found(tmp_path):
    clean_run(tmp_path / "exp" / "trial_a" / "reward_audit")
    leaky_run(tmp_path / "exp" / "trial_b" / "reward_audit")
    assert invoke("compare", str(tmp_path / "exp" / "trial_a")).exit_code == 0
    result = invoke("compare", str(tmp_path / "exp"))
    assert result.exit_code == 1
    assert "== trial_a" in result.output and "== trial_b" in result.output


def test_leak_exits_1_and_verbose_shows_evidence(tmp_path):
    path = leaky_run(tmp_path / "r")
    result = invoke("compare", path)
    assert result.exit_code == 1
    assert "LEAK       train module p0" in result.output
    assert "episode e1" not in result.output
    verbose = invoke("compare", path, "--verbose")
    assert "episode e1 (runner train/0/aaaaaaaa, 2 chunks): truth 3, reported 13, diff +10" in verbose.output
    assert "agent 1's earlier-chunk rewards (+10)" in verbose.output


def test_fail_on_selects_failing_verdicts(tmp_path):
    path = leaky_run(tmp_path / "r")
    assert invoke("compare", path, "--fail-on", "drop").exit_code == 0
    assert invoke("compare", path, "--fail-on", "leak").exit_code == 1
    bad = invoke("compare", path, "--fail-on", "leek")
    assert bad.exit_code == 2 and "leek" in bad.output


def test_json_shape(tmp_path):
    result = invoke("compare", leaky_run(tmp_path / "t" / "reward_audit"), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.output)
    assert (doc["ok"], doc["counts"], doc["tool"]["name"]) == (False, {"CLEAN": 1, "LEAK": 1}, "reward_audit")
    [run] = doc["runs"]
    assert (run["name"], run["ok"], run["ray_version"], run["counts"]) == ("t", False, "synthetic", {"CLEAN": 1, "LEAK": 1})
    leak = [d for d in run["findings"] if d["verdict"] == "LEAK"]
    assert len(leak) == 1
    d = leak[0]
    assert {"phase", "kind", "key", "verdict", "episodes", "truth", "reported", "difference", "evidence", "failing"} <= set(d)
    assert (d["phase"], d["kind"], d["key"], d["truth"], d["reported"], d["difference"], d["failing"]) == ("train", "module", "p0", 3.0, 13.0, 10.0, True)
    assert d["evidence"][0]["episode_id"] == "e1"
    assert [f["failing"] for f in run["findings"] if f["verdict"] == "CLEAN"] == [False]


# ---------------------------------------------------------------- bad input -> exit 2


def _truncate(path: str) -> str:
    [part] = os.listdir(os.path.join(path, "raw_rewards"))
    file = os.path.join(path, "raw_rewards", part)
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    return file


def _wrong_manifest_version(path: str) -> str:
    file = os.path.join(path, "run.json")
    m = json.load(open(file))
    m["schema_version"] = 99
    json.dump(m, open(file, "w"))
    return file


def _wrong_part_version(path: str) -> str:
    [part] = os.listdir(os.path.join(path, "raw_rewards"))
    file = os.path.join(path, "raw_rewards", part)
    table = pq.read_table(file)
    pq.write_table(table.replace_schema_metadata({b"reward_audit.schema_version": b"0"}), file)
    return file


def _other_tool(path: str) -> str:
    file = os.path.join(path, "run.json")
    json.dump({"tool": "wandb", "run": 3}, open(file, "w"))
    return file


def _corrupt_manifest(path: str) -> str:
    file = os.path.join(path, "run.json")
    open(file, "w").write("{not json")
    return file


def _nan_reward(path: str) -> str:
    [part] = os.listdir(os.path.join(path, "raw_rewards"))
    file = os.path.join(path, "raw_rewards", part)
    table = pq.read_table(file)
    rewards = table.column("reward").to_pylist()
    rewards[0] = float("nan")
    i = table.schema.get_field_index("reward")
    table = table.set_column(i, table.schema.field(i), pa.array(rewards, pa.float64()))
    pq.write_table(table, file)
    return file


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_truncate, "unreadable Parquet"),
        (_wrong_manifest_version, "schema version 99, this reward_audit reads versions 1, 2"),
        (_wrong_part_version, "schema version 0, this reward_audit reads versions 1, 2"),
        (_other_tool, "not a reward_audit manifest"),
        (_corrupt_manifest, "not valid JSON"),
        (_nan_reward, "non-finite `reward`"),
    ],
)
def test_damaged_run_exits_2_with_one_line(tmp_path, damage, expected):
    path = clean_run(tmp_path / "r")
    file = damage(path)
    result = invoke("compare", path)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert expected in lines[0] and file in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: str(p / "missing"), "no such folder"),
        (lambda p: str(p), "no reward_audit data here"),
        (lambda p: (open(p / "f.txt", "w").close(), str(p / "f.txt"))[1], "is a file"),
    ],
)
def test_missing_or_empty_input_exits_2(tmp_path, make, expected):
    path = make(tmp_path)
    result = invoke("compare", path)
    assert result.exit_code == 2
    assert expected in result.output and path in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unexpected_error_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    path = clean_run(tmp_path / "r")

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr("reward_audit.cli.compare", broken)
    result = invoke("compare", path)
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {path}: could not audit (KeyError: 'boom'); rerun with `REWARD_AUDIT_DEBUG=1` for the traceback and report it"


def test_progress_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    import sys

    from reward_audit.cli import audit_all
    from reward_audit.synthetic import generate_run

    generate_run(str(tmp_path), iterations=4, episodes_per_iteration=8)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    audit_all(str(tmp_path), 1e-6, 1e-5, progress=True)
    shown = capsys.readouterr()
    assert "reward-audit:" in shown.err and "window 1/1" in shown.err and shown.out == ""
    audit_all(str(tmp_path), 1e-6, 1e-5, progress=False)  # --json: never
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # piped: never
    audit_all(str(tmp_path), 1e-6, 1e-5, progress=True)
    assert capsys.readouterr().err == ""


def test_json_output_has_no_progress_or_stray_text(tmp_path):
    from reward_audit.synthetic import generate_run

    generate_run(str(tmp_path), iterations=3, episodes_per_iteration=8, inject="leak", inject_every=1)
    result = CliRunner().invoke(main, ["compare", str(tmp_path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["ok"] is False


def test_compact_command(tmp_path):
    from reward_audit.synthetic import generate_run

    generate_run(str(tmp_path), iterations=5, episodes_per_iteration=8)
    before = invoke("compare", str(tmp_path)).output
    result = invoke("compact", str(tmp_path))
    assert result.exit_code == 0 and "raw_rewards: 5 parts -> 1" in result.output
    assert invoke("compact", str(tmp_path)).output.startswith("raw_rewards: 1 parts -> 1")
    assert invoke("compare", str(tmp_path)).output == before
