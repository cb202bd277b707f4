"""Property-based: on any small run hypothesis can build — any mapping of agents to
modules, chunked episodes spread over iterations, reported values that are right, leaked,
dropped, off, missing or extra, episodes cut or never reported — the columnar compare,
whatever its streaming window, reaches the same findings as the previous row-by-row
implementation (tests/legacy/)."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "legacy"))

import legacy_compare  # noqa: E402

from reward_audit import compare  # noqa: E402
from reward_audit.store import RunWriter, load_run  # noqa: E402
from synth import manifest  # noqa: E402

FAULTS = ["exact", "exact", "exact", "leak", "drop", "off", "missing", "extra"]


@st.composite
def runs(draw):
    agents = [str(a) for a in range(draw(st.integers(1, 4)))]
    modules = [f"p{m}" for m in range(draw(st.integers(1, 3)))]
    kinds = draw(st.sets(st.sampled_from(["agent", "module", "policy", "episode"]), min_size=1))
    runner, seq, raw, reported = "train/1/aaaaaaaa", 0, [], []
    for e in range(draw(st.integers(1, 6))):
        episode = f"e{e}"
        mapping = {a: draw(st.sampled_from(modules)) for a in agents}
        chunks = draw(st.integers(1, 3))
        rewards = [{a: draw(st.integers(-40, 40)) / 4 + e / 1000 for a in agents} for _ in range(chunks)]
        cut = draw(st.booleans()) and draw(st.booleans())
        for c, chunk in enumerate(rewards):
            for a, r in chunk.items():
                raw.append(
                    {
                        "phase": "train", "runner_id": runner, "worker_index": 1, "env_index": 0, "episode_id": episode,
                        "chunk_seq": seq + c, "agent_id": a, "agent_id_type": "int", "module_id": mapping[a], "reward": r,
                        "n_rewards": 1, "pre_obs_reward": 0.0, "n_pre_obs": 0, "episode_done": c == chunks - 1 and not cut,
                        "reward_cancel": 0.0, "reward_bits": 53,
                        "iteration": 1 + (seq + c) // 2,
                    }
                )
        seq += chunks
        if cut or draw(st.integers(0, 9)) == 0:  # cut, or finished but never reported
            continue
        own = {a: sum(ch[a] for ch in rewards) for a in agents}
        earlier = {a: sum(ch[a] for ch in rewards[:-1]) for a in agents}
        final = {a: rewards[-1][a] for a in agents}
        values = []
        if "agent" in kinds:
            values += [("agent", a, None, own[a], [b for b in agents if b != a], [a]) for a in agents]
        if "module" in kinds:
            for m in sorted(set(mapping.values())):
                mine = [a for a in agents if mapping[a] == m]
                values.append(("module", None, m, sum(own[a] for a in mine), [a for a in agents if a not in mine], mine))
        if "policy" in kinds:
            values += [("policy", a, mapping[a], own[a], [b for b in agents if b != a], [a]) for a in agents]
        if "episode" in kinds:
            values.append(("episode", None, None, sum(own.values()), [], agents))
        iteration = 1 + (seq - 1) // 2
        for kind, a, m, truth, others, mine in values:
            fault = draw(st.sampled_from(FAULTS))
            if fault == "missing":
                continue
            value = {
                "exact": truth,
                "leak": truth + sum(earlier[b] for b in others),
                "drop": truth - sum(final[b] for b in mine[:-1]) if len(mine) > 1 else truth - final[mine[0]],
                "off": truth + 0.5,
                "extra": truth,
            }[fault]
            row = {"phase": "train", "runner_id": runner, "episode_id": episode, "kind": kind, "agent_id": a, "module_id": m,
                   "value": value, "semantics": "episode_sum_counted", "metrics_call": iteration - 1, "iteration": iteration}
            reported.append(row)
            if fault == "extra" and kind in ("module", "policy"):  # a module the agent(s) were not mapped to
                reported.append({**row, "module_id": "ghost", "value": 1.0})
            if fault == "extra" and kind == "agent":  # an agent the env never paid
                reported.append({**row, "agent_id": "ghost", "value": 0.0})
    return raw, reported


def _same(a, b) -> bool:
    return a == pytest.approx(b, rel=1e-9, abs=1e-9) if a is not None and b is not None else a is None and b is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(run=runs(), window=st.sampled_from([None, 1, 4, 40]))
def test_columnar_compare_agrees_with_previous(tmp_path_factory, run, window):
    raw, reported = run
    folder = str(tmp_path_factory.mktemp("run"))
    writer = RunWriter(folder)
    writer.write_manifest(manifest())
    for it in sorted({r["iteration"] for r in raw} | {r["iteration"] for r in reported}):
        writer.write_rows("raw_rewards", [r for r in raw if r["iteration"] == it], f"{it:06d}-train")
        writer.write_rows("reported_episodes", [r for r in reported if r["iteration"] == it], f"{it:06d}-train")
    old = legacy_compare.compare(load_run(folder))
    new = compare(folder, window_rows=window)
    assert [(f.phase, f.kind, f.key, f.verdict, f.episodes, f.counts) for f in new.findings] == [
        (f.phase, f.kind, f.key, f.verdict, f.episodes, f.counts) for f in old.findings
    ]
    for x, y in zip(new.findings, old.findings):
        assert _same(x.truth, y.truth) and _same(x.reported, y.reported)
        # Evidence: the same episodes (the order of equal differences may differ).
        assert sorted((e.episode_id, round(e.difference, 9)) for e in x.evidence) == sorted((e.episode_id, round(e.difference, 9)) for e in y.evidence) or len(
            {round(abs(e.difference), 9) for e in y.evidence}
        ) < len(y.evidence) or len(y.evidence) == 5
