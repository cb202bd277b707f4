"""known_bugs.py: the table, each signature as a specification row, and the notes
``compare`` adds on the recorded runs (fixtures/runs/) and on synthetic runs."""

from __future__ import annotations

import json
import os

import pytest

from reward_audit import compare
from reward_audit.audit import Audit, Finding, Verdict
from reward_audit.known_bugs import CHUNK_LEAK, CLIP_REWARDS, KNOWN_BUGS, PRE_OBSERVATION, SHARED_MODULE, matches
from reward_audit.report import render_markdown, render_text
from reward_audit.synthetic import generate_run

RUNS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "runs")
PREFIX = "matches a known RLlib"

LEAK_NOTE = (
    "matches a known RLlib bug: Ray 2.10 – 2.23 chunk leak: an episode sampled in several `sample()` chunks adds the whole "
    "multi-agent return of its earlier chunks to every agent / module value (ray-project/ray#45057, fixed in Ray 2.24 by "
    "#45543); known to affect only the reported metrics, not training"
)
SHARED_NOTE = (
    "matches a known RLlib bug: Ray 2.20 – 2.53 shared-module overwrite: a module shared by several agents reports the "
    "final chunk of only the last of its agents (ray-project/ray#59860, fixed in Ray 2.54 by #60234); known to affect "
    "only the reported metrics, not training"
)


def _known(audit: Audit) -> list[str]:
    return [n for n in audit.notes if n.startswith(PREFIX)]


# --------------------------------------------------------------------------- the table


def test_table():
    assert [b.id for b in KNOWN_BUGS] == ["chunk-leak", "shared-module-overwrite", "waiting-player-cut", "clip-rewards", "pre-observation-rewards"]
    assert (CHUNK_LEAK.versions, CHUNK_LEAK.reference) == ("2.10 – 2.23", "ray-project/ray#45057, fixed in Ray 2.24 by #45543")
    assert (SHARED_MODULE.versions, SHARED_MODULE.reference) == ("2.20 – 2.53", "ray-project/ray#59860, fixed in Ray 2.54 by #60234")
    assert (CLIP_REWARDS.versions, CLIP_REWARDS.reference) == ("2.10 and later", "")
    assert PRE_OBSERVATION.signature is None  # compare's EXCLUDED finding already says it


@pytest.mark.parametrize(
    "bug, version, affected",
    [
        (CHUNK_LEAK, "2.9.3", False),
        (CHUNK_LEAK, "2.10.0", True),
        (CHUNK_LEAK, "2.12.0", True),
        (CHUNK_LEAK, "2.23.0", True),
        (CHUNK_LEAK, "2.24.0", False),
        (SHARED_MODULE, "2.12.0", False),
        (SHARED_MODULE, "2.20.0", True),
        (SHARED_MODULE, "2.53.0", True),
        (SHARED_MODULE, "2.54.1", False),
        (SHARED_MODULE, "2.60.0", False),
        (CLIP_REWARDS, "2.60.0", True),
        (CHUNK_LEAK, None, None),
        (CHUNK_LEAK, "nightly", None),
    ],
)
def test_affected_versions(bug, version, affected):
    assert bug.affects(version) is affected


# --------------------------------------------------------------------------- signatures, one row each


def _finding(verdict: Verdict, kind: str = "module", message: str = "", attribution: str | None = None) -> Finding:
    return Finding("train", kind, "p0", verdict, 4, 1.0, 2.0, 1.0, message, attribution=attribution)


LEAK_MSG = "LEAK in 4/4 episodes (mean truth 1, reported 2); 4/4 wrong values come from multi-chunk episodes, 0 multi-chunk values are right"
DROP_MSG = "DROP in 4/4 episodes (...); 4/4 wrong values come from multi-chunk episodes, ...; in 4/4 wrong values: reported = truth − agent 0's final-chunk rewards"
CLIP_MSG = "MISMATCH in 4/4 episodes (...); in 4/4 wrong values: reported = Σ clip(r): RLlib clipped the env's rewards before counting them"


@pytest.mark.parametrize(
    "manifest, finding, expected",
    [
        ({"ray_version": "2.12.0", "api_stack": "new"}, _finding(Verdict.LEAK, "policy", LEAK_MSG), ["chunk-leak"]),
        ({"ray_version": "2.23.0", "api_stack": "new"}, _finding(Verdict.LEAK, "module", LEAK_MSG), ["chunk-leak"]),
        ({"ray_version": "2.24.0", "api_stack": "new"}, _finding(Verdict.LEAK, "module", LEAK_MSG), []),  # fixed
        ({"ray_version": "2.12.0", "api_stack": "old"}, _finding(Verdict.LEAK, "policy", LEAK_MSG), []),  # other stack
        ({"ray_version": "2.12.0", "api_stack": "new"}, _finding(Verdict.LEAK, "policy", LEAK_MSG.replace("4/4 wrong", "3/4 wrong")), []),  # a single-chunk episode is wrong too
        ({"ray_version": "2.12.0", "api_stack": "new"}, _finding(Verdict.DROP, "policy", LEAK_MSG), []),
        ({"ray_version": "2.53.0", "api_stack": "new"}, _finding(Verdict.DROP, "module", DROP_MSG, "reported(module p0) ≈ 1.00 × agent 1 final chunks (own)"), ["shared-module-overwrite"]),
        ({"ray_version": "2.53.0", "api_stack": "new"}, _finding(Verdict.DROP, "module", DROP_MSG, "reported(module p0) ≈ 1.00 × agent 0 earlier chunks (own)"), []),  # one agent
        ({"ray_version": "2.53.0", "api_stack": "new"}, _finding(Verdict.DROP, "agent", DROP_MSG, "reported(agent 0) ≈ 1.00 × agent 1 final chunks (own)"), []),
        ({"ray_version": "2.60.0", "api_stack": "new"}, _finding(Verdict.DROP, "module", DROP_MSG, "reported(module p0) ≈ 1.00 × agent 1 final chunks (own)"), []),
        ({"ray_version": "2.60.0", "api_stack": "old", "clip_rewards": True}, _finding(Verdict.MISMATCH, "policy", CLIP_MSG), ["clip-rewards"]),
        ({"ray_version": "2.12.0", "api_stack": "old", "clip_rewards": 2.5}, _finding(Verdict.MISMATCH, "policy", CLIP_MSG), ["clip-rewards"]),
        ({"ray_version": "2.60.0", "api_stack": "old", "clip_rewards": None}, _finding(Verdict.MISMATCH, "policy", CLIP_MSG), []),
        ({"ray_version": "2.60.0", "api_stack": "new", "clip_rewards": True}, _finding(Verdict.MISMATCH, "module", CLIP_MSG), []),
        ({"ray_version": "2.60.0", "api_stack": "old", "clip_rewards": True}, _finding(Verdict.MISMATCH, "policy", "MISMATCH in 4/4 episodes"), []),
        ({"ray_version": "2.12.0", "api_stack": "new"}, _finding(Verdict.CLEAN, "policy", "4 episodes agree"), []),
    ],
)
def test_signature(manifest, finding, expected):
    audit = Audit("/run", "run", manifest, (finding,))
    assert [b.id for b in matches(audit)] == expected


# --------------------------------------------------------------------------- compare's notes


def test_ray212_leak_fixture_names_the_chunk_leak():
    audit = compare(os.path.join(RUNS, "ray212_newstack_leak"))
    assert _known(audit) == [LEAK_NOTE]
    assert f"note: {LEAK_NOTE}" in render_text(audit)
    assert "- matches a known RLlib bug: Ray 2.10 – 2.23 chunk leak" in render_markdown([audit])  # (backticks escaped)
    assert LEAK_NOTE in audit.to_dict()["notes"]


def test_ray253_drop_fixture_names_the_shared_module_overwrite():
    audit = compare(os.path.join(RUNS, "ray253_shared_module_drop"))
    assert _known(audit) == [SHARED_NOTE]


def test_clean_run_gets_no_note(tmp_path):
    generate_run(str(tmp_path), iterations=2, episodes_per_iteration=20, agents=4, modules=2, runners=2)
    audit = compare(str(tmp_path))
    assert audit.ok and _known(audit) == []


@pytest.mark.parametrize("ray_version, expected", [("2.60.0", []), ("2.53.0", [SHARED_NOTE]), ("2.20.0", [SHARED_NOTE])])
def test_the_same_drop_is_named_only_on_affected_versions(tmp_path, ray_version, expected):
    run = generate_run(str(tmp_path), iterations=2, episodes_per_iteration=20, agents=4, modules=2, runners=2, inject="drop", inject_every=1)
    path = os.path.join(run.path, "run.json")
    with open(path) as f:
        manifest = json.load(f)
    with open(path, "w") as f:
        json.dump({**manifest, "ray_version": ray_version}, f)
    audit = compare(str(tmp_path))
    assert any(f.verdict is Verdict.DROP for f in audit.findings)
    assert _known(audit) == expected


@pytest.mark.parametrize("ray_version, stack, named", [("2.60.0", "new", True), ("2.53.0", "new", True), ("2.12.0", "new", False), ("2.60.0", "old", False)])
def test_waiting_player_cut_is_named_where_batches_and_metrics_both_drop(tmp_path, ray_version, stack, named):
    """White's final-chunk reward (2) is in neither RLlib's value nor its training batch."""
    from synth import SynthRun

    from reward_audit import compare

    run = SynthRun()
    run.episode("e1", [{"white": 1.0, "black": -0.5}, {"white": 2.0, "black": -1.0}], {"white": "p_white", "black": "p_black"})
    run.report("e1", "agent", 1.0, agent="white")
    run.report("e1", "agent", -1.5, agent="black")
    for chunk, agent, module, reward in [(0, "white", "p_white", 1.0), (0, "black", "p_black", -0.5), (1, "black", "p_black", -1.0)]:
        run.trained("e1", chunk, agent, module, reward)
    audit = compare(run.write(str(tmp_path / "run"), ray_version=ray_version, api_stack=stack))
    assert {(f.phase, f.key): f.verdict.value for f in audit.findings if f.key == "white"} == {("train", "white"): "DROP", ("learning", "white"): "DROP"}
    assert any(n.startswith("matches a known RLlib bug: turn-based episodes cut") for n in audit.notes) is named, audit.notes
