"""Was anything lost between the env runners and the run folder? Read from the ``drains``
table (one row per hand-over of a runner's rows to the driver, schema 3) and the
manifest's ``segments`` (restores). Pure; no Ray.

* a gap in a runner's ``drain_seq`` is a hand-over that never reached the folder: the rows
  it held are lost, so none of that runner's episodes can be judged (left out, INCOMPLETE);
* fewer stored rows than the hand-overs claim: a part file is missing (INCOMPLETE, same);
  fewer stored training-batch rows (schema 4): the runner's episodes are left out of phase
  ``learning`` only;
* ``dropped_episode_ids``: episodes a runner dropped whole when its buffer was full (left
  out, INCOMPLETE);
* a new ``runner_id`` at the same (phase, worker index): the runner was restarted; the
  rows the old one buffered after its last hand-over died with it (said, with the
  iterations; its unfinished episodes show as INCOMPLETE);
* more than one segment: the run was restored; iterations are numbered in the order they
  ran, and the notes map them to RLlib's ``training_iteration``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .audit import Finding, Verdict, plural
from .errors import InvalidDataError
from .schema import Kind, Phase
from .store import Run, drop_identical
from .window import LeftOut


@dataclass
class Handover:
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    left_out: LeftOut = field(default_factory=lambda: LeftOut(set(), set()))
    claimed: dict = field(default_factory=dict)  # runner id -> raw rows its hand-overs wrote
    claimed_batch: dict = field(default_factory=dict)  # runner id -> batch rows they wrote (schema 4)
    where: dict = field(default_factory=dict)  # runner id -> (phase, description, iterations)
    unbatched: set = field(default_factory=set)  # runners whose batch rows were lost: not judged in `learning`

    def missing_rows(self, stored: dict[str, int]) -> bool:
        """After the pass: runners with fewer raw rows in the folder than their hand-overs
        wrote (a part file deleted). Returns True if any was found: they are left out, and
        the pass must run again."""
        found = False
        for runner, claimed in self.claimed.items():
            have = stored.get(runner, 0)
            if have >= claimed or runner in self.left_out.runners:
                continue
            phase, who, its = self.where[runner]
            self.left_out.runners.add(runner)
            self.findings.append(
                Finding(phase, Kind.EPISODE.value, "lost-rows", Verdict.INCOMPLETE, 0, None, None, None,
                        f"{who}: {claimed - have} of the {claimed} raw rows its hand-overs wrote are missing from raw_rewards/ "
                        f"(a part file deleted?; iterations {its}); none of its episodes are judged")
            )
            found = True
        return found


    def missing_batch_rows(self, stored: dict[str, int]) -> bool:
        """After the pass: runners with fewer batch rows in the folder than their hand-overs
        wrote (a ``batch_rewards`` part deleted). Their episodes are left out of phase
        ``learning`` only; returns True if any was found (the pass must run again)."""
        found = False
        for runner, claimed in self.claimed_batch.items():
            have = stored.get(runner, 0)
            if have >= claimed or runner in self.unbatched or runner in self.left_out.runners:
                continue
            _, who, its = self.where[runner]
            self.unbatched.add(runner)
            self.findings.append(
                Finding(Phase.LEARNING.value, Kind.EPISODE.value, "lost-rows", Verdict.INCOMPLETE, 0, None, None, None,
                        f"{who}: {claimed - have} of the {claimed} training-batch rows its hand-overs wrote are missing from batch_rewards/ "
                        f"(a part file deleted?; iterations {its}); none of its episodes are judged in phase learning")
            )
            found = True
        return found


def _ranges(values: list[int]) -> str:
    """[2, 3, 4, 7] -> '2–4, 7'."""
    out, values = [], sorted(set(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}–{values[j]}")
        i = j + 1
    return ", ".join(out)


def _short(runner_id: str) -> str:
    return runner_id.rsplit("/", 1)[-1]


def check_handover(run: Run) -> Handover:
    out = Handover()
    _segments(run, out)
    drains = run.read("drains").to_pandas()
    if drains.empty:
        # Recorded by a collector that writes hand-overs (it also writes `segments`), yet none
        # are here: the folder was damaged. (Schema 1 and 2 runs predate the check.)
        if run.rows("raw_rewards") and run.manifest.get("segments"):
            out.findings.append(
                Finding("run", "run", "hand-over", Verdict.INCOMPLETE, 0, None, None, None,
                        f"{run.path}/drains/ is missing or empty: whether rows were lost between the env runners and the folder cannot be checked")
            )
        return out
    drains = _unique_drains(run, drains)
    lost_runners: set[str] = set()
    for runner, d in drains.sort_values("drain_seq").groupby("runner_id", sort=False):
        last = d.iloc[-1]
        phase, index = last["phase"], int(last["worker_index"])
        who = f"runner {phase}/{index} ({_short(runner)})"
        seqs = d["drain_seq"].tolist()
        missing = sorted(set(range(int(seqs[-1]) + 1)) - set(seqs))
        problems = []
        if missing:
            problems.append(f"{plural(len(missing), 'hand-over')} never reached the folder (drain {_ranges(missing)})")
        produced = int(last["raw_total"]) - int(last["dropped_raw"])
        claimed = out.claimed[runner] = int(d["raw_rows"].sum())
        if d["batch_rows"].notna().any():
            out.claimed_batch[runner] = int(d["batch_rows"].fillna(0).sum())
        out.where[runner] = (str(phase), who, _ranges(d["iteration"].tolist()))
        if produced > claimed:
            problems.append(f"{produced - claimed} raw rows it produced were never written")
        if problems:
            lost_runners.add(runner)
            out.findings.append(
                Finding(str(phase), Kind.EPISODE.value, "lost-rows", Verdict.INCOMPLETE, 0, None, None, None,
                        f"{who}: " + "; ".join(problems) + f" (iterations {_ranges(d['iteration'].tolist())}); none of its episodes are judged")
            )
        dropped = {e for ids in d["dropped_episode_ids"] if ids is not None for e in ids}
        if dropped and runner not in lost_runners:
            out.left_out.episodes |= {(runner, e) for e in dropped}
            out.findings.append(
                Finding(str(phase), Kind.EPISODE.value, "dropped", Verdict.INCOMPLETE, len(dropped), None, None, None,
                        f"{who} dropped {plural(len(dropped), 'episode')} ({int(last['dropped_raw'])} raw rows, {int(last['dropped_reported'])} reports) "
                        f"because its buffer was full (`$REWARD_AUDIT_MAX_BUFFERED_ROWS`); left out of the audit, e.g. {sorted(dropped)[0]}")
            )
    out.left_out.runners |= lost_runners
    _restarts(drains, out)
    return out


def _unique_drains(run: Run, drains: pd.DataFrame) -> pd.DataFrame:
    drains, conflict = drop_identical(drains, ["runner_id", "drain_seq"])
    if conflict is not None:
        raise InvalidDataError(
            f"{run.path}/drains/: hand-over {conflict['drain_seq']} of runner {conflict['runner_id']} is recorded twice with different counts; "
            "the folder mixes two runs' files — keep the original run's files and delete the others"
        )
    return drains


def _restarts(drains: pd.DataFrame, out: Handover) -> None:
    """Per (phase, worker index): iterations without a hand-over, and new incarnations. A
    runner that crashed took the rows it held since its last hand-over with it (RLlib
    loses its metrics too); how many is unknowable here, the iterations are not."""
    for phase, p in drains.groupby("phase"):
        iterations = set(p["iteration"].tolist())
        for index, d in p.groupby("worker_index"):
            spans = d.groupby("runner_id").agg(first=("iteration", "min"), last=("iteration", "max"), seq=("drain_seq", "min")).sort_values("first")
            silent = sorted(iterations - set(d["iteration"].tolist()))
            # A fresh incarnation: a second runner id, or the first one starting after the
            # phase's first hand-over (its predecessor died before handing anything over).
            restarts = len(spans) - 1 + int(spans["first"].iloc[0] > min(iterations))
            if not restarts and not silent:
                continue
            lives = "; ".join(f"incarnation {_short(r)}: iterations {s.first}–{s.last}" if s.first != s.last else f"incarnation {_short(r)}: iteration {s.first}" for r, s in spans.iterrows())
            text = f"runner {phase}/{index} "
            text += ("was restarted" + (f" {restarts} times" if restarts > 1 else "")) if restarts else "stopped answering"
            if silent:
                text += f"; no hand-over in iterations {_ranges(silent)}"
            text += f" ({lives}). The rows a crashed incarnation held since its last hand-over were lost with it, and so were RLlib's values for them"
            quiet = [int(i) for i, n in d.groupby("iteration")["reported_rows"].sum().items() if n == 0]
            if quiet:
                text += f"; iterations {_ranges(quiet)} reported no episodes from it"
            out.findings.append(Finding(str(phase), Kind.EPISODE.value, f"runner-{index}", Verdict.INCOMPLETE, 0, None, None, None, text))


def _segments(run: Run, out: Handover) -> None:
    segments = run.manifest.get("segments") or []
    if len(segments) < 2:
        return
    for s in segments[1:]:
        first, last = s.get("first_iteration"), s.get("last_iteration")
        rllib = s.get("first_training_iteration")
        how = {"restored": "restored in the same process (`algo.restore()`)", "reopened": "reopened by a new process (restored from a checkpoint)"}.get(
            s.get("reason"), str(s.get("reason"))
        )
        span = f"iterations {first}–{last}" if last and last != first else f"iteration {first}"
        out.notes.append(f"{how} at RLlib iteration {rllib}: the audit numbers iterations in the order they ran, so {span} here are RLlib's {rllib}–{s.get('last_training_iteration', '?')}")
