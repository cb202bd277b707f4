"""Nothing lost silently between the env runners and the run folder (issue 9): the real
``RunnerRecorder`` and ``Collector`` driven by a fake algorithm (no Ray), then ``compare``.

Each test plays episodes whose rewards it states, loses or damages something on the way,
and checks that the audit names it (INCOMPLETE with counts and runner ids) and never turns
it into a failing verdict.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import threading

import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner
from synth import manifest

from reward_audit import load_run, Verdict, compare
from reward_audit.capture.base import RECORDER_ATTR, Adapter
from reward_audit.cli import main
from reward_audit.collector import Collector
from reward_audit.recorder import RunnerRecorder
from reward_audit.schema import Phase

# --------------------------------------------------------------------------- a fake algorithm


MAPPING = {"a": "pa", "b": "pb"}


class FakeRunner:
    def __init__(self, index: int):
        setattr(self, RECORDER_ATTR, RunnerRecorder(Phase.TRAIN, index, mapping_of=lambda e: MAPPING))
        self.next_episode = 0

    @property
    def recorder(self) -> RunnerRecorder:
        return getattr(self, RECORDER_ATTR)

    def restart(self) -> None:
        """A crashed actor comes back: a new recorder, whatever the old one held is gone."""
        index = self.recorder.worker_index
        setattr(self, RECORDER_ATTR, RunnerRecorder(Phase.TRAIN, index, mapping_of=lambda e: MAPPING))

    def play(self, chunks: list[dict], *, report: bool = True, batches: bool = False) -> str:
        """One episode of agents a (module pa) and b (module pb): ``chunks[i]`` = rewards per
        agent in sample() call i. RLlib's report (the true sums) is recorded when it ends;
        ``batches``: each call's training batch too (the true rewards, ``batch_rewards``)."""
        rec = self.recorder
        episode = f"{rec.runner_id}-e{self.next_episode}"
        self.next_episode += 1
        rec.tap_reset(0, {"a": 0, "b": 0})
        for i, rewards in enumerate(chunks):
            rec.tap_step(0, {"a": 0, "b": 0}, rewards)
            if batches:
                rec.batch_rewards([(episode, aid, MAPPING[aid], r, 1, 53) for aid, r in rewards.items()])
            if i == len(chunks) - 1:
                rec.episode_ends(episode, 0, "episode")
                if report:
                    totals = {aid: sum(c.get(aid, 0.0) for c in chunks) for aid in MAPPING}
                    rec.reported_episode(episode, sum(totals.values()), totals, {MAPPING[a]: v for a, v in totals.items()})
            else:
                rec.episode_step(episode, 0, "episode")
            rec.sample_ends()
        return episode

    def start(self, first: dict) -> str:
        """An episode that starts now and goes on in ``finish``."""
        rec = self.recorder
        episode = f"{rec.runner_id}-e{self.next_episode}"
        self.next_episode += 1
        rec.tap_reset(0, {"a": 0, "b": 0})
        rec.tap_step(0, {"a": 0, "b": 0}, first)
        rec.episode_step(episode, 0, "episode")
        rec.sample_ends()
        self._open = (episode, [first])
        return episode

    def finish(self, last: dict) -> None:
        rec = self.recorder
        episode, chunks = self._open
        chunks.append(last)
        rec.tap_step(0, {"a": 0, "b": 0}, last)
        rec.episode_ends(episode, 0, "episode")
        totals = {aid: sum(c.get(aid, 0.0) for c in chunks) for aid in ("a", "b")}
        rec.reported_episode(episode, sum(totals.values()), totals, {"pa": totals["a"], "pb": totals["b"]})
        rec.sample_ends()


class FakeAlgorithm:
    def __init__(self, trial: str, runners: int = 2):
        self.trial = trial
        self.iteration = 0
        self.runners = [FakeRunner(i + 1) for i in range(runners)]


class FakeAdapter(Adapter):
    name = "fake"

    def runner_groups(self, algorithm):
        return [(algorithm, Phase.TRAIN)]

    def foreach_runner(self, algorithm, fn):
        return [fn(r) for r in algorithm.runners]

    def trial_dir(self, algorithm):
        return algorithm.trial, pafs.LocalFileSystem()

    def manifest(self, algorithm):
        return manifest(created_at="2026-11-27T00:00:00+00:00")

    def iteration_rows(self, result, iteration):
        return []


def train(collector: Collector, algorithm: FakeAlgorithm) -> int:
    """What the callback does at ``on_train_result``."""
    algorithm.iteration += 1
    iteration = collector.next_iteration(algorithm.iteration)
    collector.collect(algorithm, iteration, (Phase.TRAIN,))
    return iteration


def run_folder(tmp_path) -> tuple[FakeAlgorithm, Collector]:
    algorithm = FakeAlgorithm(str(tmp_path / "trial"))
    return algorithm, Collector(FakeAdapter(), algorithm, None)


def by_key(audit):
    return {(f.phase, f.kind, f.key): f for f in audit.findings}


def failing(audit):
    return [str(f) for f in audit.failures()]


# --------------------------------------------------------------------------- hand-overs


def test_a_clean_run_has_one_drain_per_runner_and_iteration(tmp_path):
    algorithm, collector = run_folder(tmp_path)
    for _ in range(3):
        for r in algorithm.runners:
            r.play([{"a": 1.0, "b": 10.0}, {"a": 2.0, "b": 20.0}])
        train(collector, algorithm)
    audit = compare(str(tmp_path / "trial"))
    assert audit.ok and not audit.notes, (failing(audit), audit.notes)
    assert by_key(audit)[("train", "module", "pb")].episodes == 6
    assert all(f.verdict is Verdict.CLEAN for f in audit.findings)


def test_a_lost_hand_over_is_incomplete_and_its_runner_is_not_judged(tmp_path):
    # Runner 2's episode spans three iterations; the hand-over of its middle chunk is lost.
    # Judged, the episode would be a false MISMATCH (truth 33 without the 30 of chunk 2).
    algorithm, collector = run_folder(tmp_path)
    one, two = algorithm.runners
    one.play([{"a": 1.0, "b": 10.0}])
    two.start({"a": 1.0, "b": 10.0})
    train(collector, algorithm)
    one.play([{"a": 1.0, "b": 10.0}])
    two.recorder.tap_step(0, {"a": 0, "b": 0}, {"a": 2.0, "b": 20.0})
    two.recorder.episode_step(two._open[0], 0, "episode")
    two.recorder.sample_ends()
    two.recorder.drain()  # handed over, never written: lost
    train(collector, algorithm)
    one.play([{"a": 1.0, "b": 10.0}])
    two._open = (two._open[0], [{"a": 1.0, "b": 10.0}, {"a": 2.0, "b": 20.0}])
    two.finish({"a": 0.0, "b": 0.0})
    train(collector, algorithm)
    audit = compare(str(tmp_path / "trial"))
    assert not failing(audit)
    lost = by_key(audit)[("train", "episode", "lost-rows")]
    assert lost.verdict is Verdict.INCOMPLETE
    runner2 = two.recorder.runner_id
    assert f"runner train/2 ({runner2.rsplit('/', 1)[-1]})" in lost.message
    assert "1 hand-over never reached the folder (drain 1)" in lost.message and "none of its episodes are judged" in lost.message
    assert by_key(audit)[("train", "module", "pa")].episodes == 3  # runner 1's episodes only


def test_a_deleted_part_is_incomplete_not_a_false_verdict(tmp_path):
    algorithm, collector = run_folder(tmp_path)
    one, two = algorithm.runners
    one.play([{"a": 1.0, "b": 10.0}])
    two.start({"a": 5.0, "b": 50.0})
    train(collector, algorithm)
    one.play([{"a": 1.0, "b": 10.0}])
    two.finish({"a": 1.0, "b": 10.0})
    train(collector, algorithm)
    first = sorted(glob.glob(str(tmp_path / "trial/reward_audit/raw_rewards/part-000001-*.parquet")))
    os.remove(first[0])
    audit = compare(str(tmp_path / "trial"))
    assert not failing(audit)
    messages = [f.message for f in audit.findings if f.key == "lost-rows"]
    assert len(messages) == 2  # both runners wrote into the deleted part
    assert audit.episodes.empty  # no runner's episode is judged, in the findings or the per-episode frame
    assert all("missing from raw_rewards/ (a part file deleted?" in m for m in messages)
    assert all("2 of the 4 raw rows its hand-overs wrote" in m for m in messages)  # each had 2 of 4 rows in that part


def test_a_deleted_batch_part_leaves_its_runners_out_of_learning_not_a_false_drop(tmp_path):
    algorithm, collector = run_folder(tmp_path)
    for _ in range(2):
        for r in algorithm.runners:
            r.play([{"a": 1.0, "b": 10.0}, {"a": 2.0, "b": 20.0}], batches=True)
        train(collector, algorithm)
    folder = str(tmp_path / "trial/reward_audit")
    drains = compare(folder)
    assert {(f.kind, f.key): f.verdict for f in drains.findings if f.phase == "learning" and f.kind in ("module", "agent")} == {
        ("module", "pa"): Verdict.CLEAN, ("module", "pb"): Verdict.CLEAN, ("agent", "a"): Verdict.CLEAN, ("agent", "b"): Verdict.CLEAN}
    assert set(load_run(folder).read("drains").to_pandas()["batch_rows"]) == {4}  # 2 calls x 2 agents per runner and iteration
    os.remove(sorted(glob.glob(f"{folder}/batch_rewards/part-000001-*.parquet"))[0])
    audit = compare(folder)
    assert not failing(audit)  # the metrics are still judged, and nothing is called a DROP
    lost = [f for f in audit.findings if f.phase == "learning" and f.key == "lost-rows"]
    assert len(lost) == 2 and all("4 of the 8 training-batch rows its hand-overs wrote are missing from batch_rewards/" in f.message for f in lost), [f.message for f in lost]
    assert not [f for f in audit.findings if f.phase == "learning" and f.kind in ("module", "agent")]  # none judged
    assert "learning" not in set(audit.episodes["phase"]) and {"train"} == set(audit.episodes["phase"])  # the frame agrees
    assert {(f.kind, f.key): f.verdict for f in audit.findings if f.phase == "train" and f.kind == "module"} == {("module", "pa"): Verdict.CLEAN, ("module", "pb"): Verdict.CLEAN}


def test_a_failed_write_is_retried_and_counted(tmp_path, monkeypatch):
    algorithm, collector = run_folder(tmp_path)
    original = collector.writer.write_rows
    calls = {"n": 0}

    def flaky(table, rows, tag):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full")
        return original(table, rows, tag)

    monkeypatch.setattr(collector.writer, "write_rows", flaky)
    for _ in range(2):
        for r in algorithm.runners:
            r.play([{"a": 1.0, "b": 10.0}])
        train(collector, algorithm)
    audit = compare(str(tmp_path / "trial"))
    assert audit.ok and by_key(audit)[("train", "module", "pa")].episodes == 4
    with open(tmp_path / "trial/reward_audit/run.json") as f:
        assert json.load(f)["driver_failures"] == 1


def test_a_full_buffer_drops_whole_episodes_and_the_audit_leaves_them_out(tmp_path, monkeypatch):
    monkeypatch.setenv("REWARD_AUDIT_MAX_BUFFERED_ROWS", "4")  # two episodes of 2 agents
    algorithm, collector = run_folder(tmp_path)
    one = algorithm.runners[0]
    for _ in range(3):
        one.play([{"a": 1.0, "b": 10.0}])  # the third does not fit: dropped whole
    train(collector, algorithm)
    audit = compare(str(tmp_path / "trial"))
    assert not failing(audit)
    dropped = by_key(audit)[("train", "episode", "dropped")]
    assert dropped.verdict is Verdict.INCOMPLETE and dropped.episodes == 1
    # RLlib's value came before the chunk that did not fit (reported at episode end): the
    # recorder kept it, the audit leaves it out with the episode.
    assert "dropped 1 episode (2 raw rows, 0 reports) because its buffer was full" in dropped.message
    assert by_key(audit)[("train", "module", "pa")].episodes == 2


def test_a_restarted_runner_is_said_with_its_iterations(tmp_path):
    algorithm, collector = run_folder(tmp_path)
    one, two = algorithm.runners
    for it in range(4):
        one.play([{"a": 1.0, "b": 10.0}])
        if it == 1:
            two.play([{"a": 1.0, "b": 10.0}])
            two.restart()  # crashed before its hand-over: that episode is lost
        elif it != 2:  # iteration 3: the new actor is still starting, nothing sampled
            two.play([{"a": 1.0, "b": 10.0}])
        train(collector, algorithm)
    audit = compare(str(tmp_path / "trial"))
    assert not failing(audit)
    f = by_key(audit)[("train", "episode", "runner-2")]
    assert f.verdict is Verdict.INCOMPLETE
    assert f.message.startswith("runner train/2 was restarted (incarnation "), f.message
    assert ": iteration 1; incarnation " in f.message and ": iterations 2–4)" in f.message
    # Iteration 2: the lost episode; iteration 3: the new actor had sampled nothing yet.
    assert f.message.endswith("iterations 2–3 reported no episodes from it")


# --------------------------------------------------------------------------- folders


def test_a_reopened_run_keeps_what_was_recorded(tmp_path):
    # The same trial restored by a new process (Tuner.restore, from_checkpoint into the
    # same trial dir): capture failures are kept, a segment starts, iterations go on.
    algorithm, collector = run_folder(tmp_path)
    for _ in range(2):
        for r in algorithm.runners:
            r.play([{"a": 1.0, "b": 10.0}])
        train(collector, algorithm)
    algorithm.runners[0].recorder.failures = 2
    algorithm.runners[0].play([{"a": 1.0, "b": 10.0}])
    train(collector, algorithm)
    restored = FakeAlgorithm(str(tmp_path / "trial"))
    restored.iteration = 2  # the checkpoint was taken after iteration 2
    again = Collector(FakeAdapter(), restored, None)
    for r in restored.runners:
        r.play([{"a": 1.0, "b": 10.0}])
    assert train(again, restored) == 4  # RLlib's iteration 3, the audit's 4th
    with open(tmp_path / "trial/reward_audit/run.json") as f:
        m = json.load(f)
    assert m["capture_failures"] == 2
    assert [(s["reason"], s["first_iteration"], s["first_training_iteration"]) for s in m["segments"]] == [("start", 1, 1), ("reopened", 4, 3)]
    audit = compare(str(tmp_path / "trial"))
    assert any("reopened by a new process (restored from a checkpoint) at RLlib iteration 3" in n and "iteration 4 here are RLlib's 3–3" in n for n in audit.notes), audit.notes


def test_two_drivers_never_share_a_run_folder(tmp_path):
    base = str(tmp_path / "base")
    made, errors = [], []
    barrier = threading.Barrier(8)

    def start():
        try:
            barrier.wait()
            algorithm = FakeAlgorithm(str(tmp_path / "unused"))
            made.append(Collector(FakeAdapter(), algorithm, base).location)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(made)) == 8


# --------------------------------------------------------------------------- duplicates


def recorded(tmp_path) -> str:
    algorithm, collector = run_folder(tmp_path)
    for _ in range(2):
        for r in algorithm.runners:
            r.play([{"a": 1.0, "b": 10.0}, {"a": 2.0, "b": 20.0}])
        train(collector, algorithm)
    return str(tmp_path / "trial/reward_audit")


@pytest.mark.parametrize("table", ["raw_rewards", "reported_episodes", "drains"])
def test_an_identical_copy_of_a_part_is_counted_once_with_a_note(tmp_path, table):
    folder = recorded(tmp_path)
    part = sorted(glob.glob(f"{folder}/{table}/*.parquet"))[0]
    copy = part.replace("part-000001", "part-000001-copy")
    shutil.copy(part, copy)
    audit = compare(folder)
    assert audit.ok, failing(audit)
    assert by_key(audit)[("train", "module", "pa")].episodes == 4
    if table != "drains":  # a copied hand-over record is simply the same record
        assert any(f"{table}: " in n and "appeared twice, identical copies" in n and os.path.basename(copy) in n for n in audit.notes), audit.notes


def test_a_conflicting_copy_is_exit_2_naming_both_files(tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = recorded(tmp_path)
    part = sorted(glob.glob(f"{folder}/raw_rewards/*.parquet"))[0]
    table = pq.read_table(part)
    changed = table.set_column(table.schema.get_field_index("reward"), "reward", pc.add(table["reward"], 1.0))
    copy = part.replace("part-000001", "part-000001-other")
    pq.write_table(changed.replace_schema_metadata(table.schema.metadata), copy)
    result = CliRunner().invoke(main, ["compare", folder])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and os.path.basename(part) in line and os.path.basename(copy) in line
    assert "twice with different values" in line


def test_notes_reach_every_report_format(tmp_path):
    from reward_audit.report import render_html, render_markdown, render_text

    folder = recorded(tmp_path)
    part = sorted(glob.glob(f"{folder}/raw_rewards/*.parquet"))[0]
    shutil.copy(part, part.replace("part-000001", "part-000001-copy"))
    audit = compare(folder)
    [note] = [n for n in audit.notes if "appeared twice" in n]
    assert f"note: {note}" in render_text(audit)
    assert "### Notes" in render_markdown(audit) and "appeared twice, identical copies" in render_markdown(audit)
    assert "<h3>Notes</h3>" in render_html(audit) and "appeared twice, identical copies" in render_html(audit)


def test_a_tune_restore_numbers_the_segment_from_its_first_result(tmp_path):
    # Tune builds the algorithm (on_algorithm_init at iteration 0), then loads the checkpoint:
    # the segment's RLlib iteration is the first result's, not the one seen at init.
    algorithm, collector = run_folder(tmp_path)
    for _ in range(2):
        algorithm.runners[0].play([{"a": 1.0, "b": 10.0}])
        train(collector, algorithm)
    restored = FakeAlgorithm(str(tmp_path / "trial"))
    again = Collector(FakeAdapter(), restored, None)  # iteration 0 at init
    restored.iteration = 1  # then the checkpoint of iteration 1 is loaded
    restored.runners[0].play([{"a": 1.0, "b": 10.0}])
    assert train(again, restored) == 3
    with open(tmp_path / "trial/reward_audit/run.json") as f:
        segments = json.load(f)["segments"]
    assert [(s["reason"], s["first_iteration"], s["first_training_iteration"], s["last_training_iteration"]) for s in segments] == [
        ("start", 1, 1, 2),
        ("reopened", 3, 2, 2),
    ]
    assert compare(str(tmp_path / "trial")).ok
