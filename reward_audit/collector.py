"""Driver side: where the data goes, the manifest, and once per iteration the hand-over of
every env runner's buffered rows (``foreach_env_runner``) into part files.

Runners never write: they may be remote actors on other nodes, built before the driver
knows the trial dir. The driver collects, so one folder (the trial dir Tune syncs) holds
everything, with no shared file system needed.

Where the data goes (first that applies):

1. ``$REWARD_AUDIT_DIR`` — a base folder (each Tune trial gets a sub-folder);
2. ``RewardAuditCallback.writing_to(path_or_uri)`` — same rule, any ``pyarrow.fs`` URI;
3. next to the run: ``<Tune trial dir>/reward_audit``, else ``<algorithm.logdir>/reward_audit``.

Under a base folder (1, 2) the run folder is created atomically; if it exists (another
driver, an earlier run) this run gets a fresh ``run-<time>-<id>/`` sub-folder, so two
drivers never share one. Next to the run (3) an existing run folder is the same trial
restored (``Tuner.restore``, ``Algorithm.from_checkpoint`` into the same trial dir): it is
*reopened* — what was recorded stays, failures keep counting, and a new segment starts.

Nothing recorded is lost silently: every hand-over is written as a ``drains`` row (the
runner's sequence number and running totals, so the audit sees gaps and restarts); a part
that cannot be written stays queued and is retried with the next iteration; failures on
the driver are counted in the manifest (``driver_failures``).
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
import threading
import uuid
from typing import Any, Iterable

from .capture.base import Adapter, drain_runner
from .live import LiveAudit
from .schema import AUDIT_DIR_NAME, Phase
from .store import RunWriter
from .walk import resolve_filesystem

logger = logging.getLogger("reward_audit")

ENV_VAR = "REWARD_AUDIT_DIR"
MAX_QUEUED_ROWS = 5_000_000  # rows kept for a retry while writes fail; past it, counted and dropped


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def resolve_output(adapter: Adapter, algorithm: Any, explicit: str | None) -> tuple[RunWriter, str, bool]:
    """``(writer, source, reopen)``: the run folder, why there, and whether an existing run
    there may be reopened (only next to the run, never under a shared base folder)."""
    base, source = os.environ.get(ENV_VAR), f"${ENV_VAR}"
    if not base:
        base, source = explicit, "RewardAuditCallback.writing_to()"
    if not base:
        trial = adapter.trial_dir(algorithm)
        if trial is not None:
            return RunWriter(f"{trial[0]}/{AUDIT_DIR_NAME}", trial[1]), "trial dir", True
        return RunWriter(os.path.join(adapter.log_dir(algorithm), AUDIT_DIR_NAME)), "algorithm.logdir", True
    trial = adapter.trial_dir(algorithm)
    base = str(base).rstrip("/")
    location = f"{base}/{os.path.basename(trial[0])}/{AUDIT_DIR_NAME}" if trial else f"{base}/{AUDIT_DIR_NAME}"
    writer = RunWriter(location, resolve_filesystem(location)[0] if "://" in location else None)
    for _ in range(100):
        if writer.claim():
            return writer, source, False
        fresh = f"{base}/run-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}/{AUDIT_DIR_NAME}"
        logger.warning("reward_audit: %s is taken (another run); writing this one to %s", writer.location, fresh)
        writer = RunWriter(fresh)
    raise OSError(f"{base}: could not create a fresh run folder")


class Collector:
    def __init__(self, adapter: Adapter, algorithm: Any, explicit: str | None, extra: dict[str, Any] | None = None):
        self.adapter = adapter
        self.writer, source, reopen = resolve_output(adapter, algorithm, explicit)
        self.location = self.writer.location
        self.lock = threading.Lock()
        self.runner_failures: dict[str, int] = {}  # runner id -> its cumulative count
        self.queue: list[tuple[str, list[dict], str]] = []  # parts whose write failed, retried
        self.dropped_rows = 0
        self._saved: dict | None = None
        manifest = adapter.manifest(algorithm)
        manifest.update({"output": self.location, "output_source": source, **(extra or {})})
        previous = self.writer.read_manifest() if reopen else None
        first_training = adapter.training_iteration(algorithm) + 1
        segment = {"first_training_iteration": first_training, "started_at": _now(), "pid": os.getpid()}
        if previous is not None:
            # The same trial, restored in a new process: keep what was recorded.
            segments = list(previous.get("segments") or [{"first_iteration": 1, "last_iteration": None, "reason": "start"}])
            last = max([s.get("last_iteration") or 0 for s in segments] + [0])
            manifest["created_at"] = previous.get("created_at", manifest["created_at"])
            self.failures_before = int(previous.get("capture_failures") or 0)
            self.driver_failures = int(previous.get("driver_failures") or 0)
            segments.append({**segment, "first_iteration": last + 1, "last_iteration": None, "reason": "reopened"})
            logger.warning("reward_audit: %s already holds this trial's run; reopened it (segment %d from iteration %d)", self.location, len(segments), first_training)
        else:
            self.failures_before = self.driver_failures = 0
            segments = [{**segment, "first_iteration": 1, "last_iteration": None, "reason": "start"}]
        self.iteration = segments[-1]["first_iteration"] - 1  # the audit's count of train() results
        self.training_iteration = first_training - 1
        manifest["segments"] = segments
        self.manifest = manifest
        self.live = LiveAudit(manifest, self.location)
        self._save_manifest()
        logger.info("reward_audit: recording to %s (%s)", self.location, source)

    # ------------------------------------------------------------------ iterations

    def next_iteration(self, training_iteration: int) -> int:
        """The audit's iteration for the result RLlib numbered ``training_iteration``; a
        number that goes back (``algo.restore()`` in the same process) starts a segment."""
        if training_iteration <= self.training_iteration:
            self.manifest["segments"].append(
                {"first_iteration": self.iteration + 1, "first_training_iteration": training_iteration, "started_at": _now(), "pid": os.getpid(), "reason": "restored"}
            )
            logger.warning("reward_audit: training_iteration went back from %d to %d (restored); a new segment starts", self.training_iteration, training_iteration)
        self.iteration += 1
        self.training_iteration = training_iteration
        segment = self.manifest["segments"][-1]
        if segment.get("last_iteration") is None:  # its first result: Tune restores a checkpoint after on_algorithm_init
            segment["first_training_iteration"] = training_iteration
            if segment["reason"] == "start" and training_iteration != 1:
                segment["reason"] = "reopened"  # restored from a checkpoint into a fresh folder
        segment["last_iteration"], segment["last_training_iteration"] = self.iteration, training_iteration
        return self.iteration

    # ------------------------------------------------------------------ writing

    def collect(self, algorithm: Any, iteration: int, phases: Iterable[Phase]) -> int:
        """Hand over the runners' rows of ``phases``; returns the number of raw rows."""
        wanted = set(phases)
        written = 0
        for group, phase in self.adapter.runner_groups(algorithm):
            if phase not in wanted:
                continue
            results = [r for r in self.adapter.foreach_runner(group, drain_runner) if r]
            raw = [{**row, "iteration": iteration} for r in results for row in r["raw_rewards"]]
            reported = [{**row, "iteration": iteration} for r in results for row in r["reported_episodes"]]
            batch = [{**row, "iteration": iteration} for r in results for row in r.get("batch_rewards", ())]
            drains = [
                {
                    **{k: r[k] for k in ("phase", "runner_id", "worker_index", "pid", "drain_seq", "raw_total", "reported_total", "dropped_raw", "dropped_reported", "failures")},
                    "iteration": iteration,
                    "raw_rows": len(r["raw_rewards"]),
                    "reported_rows": len(r["reported_episodes"]),
                    "batch_rows": len(r.get("batch_rewards", ())),
                    "dropped_episode_ids": r["dropped_episode_ids"] or None,
                }
                for r in results
                if "drain_seq" in r
            ]
            for r in results:  # each runner reports its cumulative count
                self.runner_failures[r["runner_id"]] = r.get("failures", 0)
            try:
                self.live.add(raw, reported, iteration)
            except Exception:
                self.driver_failures += 1
                logger.exception("reward_audit: the live audit failed on iteration %d; the run's data is still written", iteration)
            tag = f"{iteration:06d}-{phase.value}"
            with self.lock:
                self.queue += [("raw_rewards", raw, tag), ("reported_episodes", reported, tag), ("drains", drains, tag)]
                if batch:
                    self.queue.append(("batch_rewards", batch, tag))
                self._flush()
            written += len(raw)
        return written

    def record_result(self, result: dict, iteration: int) -> None:
        """Write the dashboard numbers of this ``train()`` result, and put the live audit
        into it (``result["reward_audit"]``, see ``live.py``): RLlib logs the result after
        this hook, so Tune, TensorBoard, W&B and MLflow get it."""
        rows = self.adapter.iteration_rows(result, iteration)
        with self.lock:
            self.queue.append(("reported_iterations", rows, f"{iteration:06d}"))
            self._flush()
        result["reward_audit"] = self.live.result(rows)

    def failed(self) -> None:
        """A driver hook failed: count it in the manifest (best effort)."""
        self.driver_failures += 1
        with self.lock:
            self._save_manifest()

    def _flush(self) -> None:
        """Write the queued parts in order; a failed write keeps the rest for next time."""
        while self.queue:
            table, rows, tag = self.queue[0]
            try:
                self.writer.write_rows(table, rows, tag)
            except Exception:
                self.driver_failures += 1
                queued = sum(len(r) for _, r, _ in self.queue)
                logger.exception("reward_audit: could not write %d %s rows to %s; %d rows stay queued for the next iteration", len(rows), table, self.location, queued)
                while self.queue and queued > MAX_QUEUED_ROWS:
                    _, dropped, _ = self.queue.pop(0)
                    queued -= len(dropped)
                    self.dropped_rows += len(dropped)
                    self.manifest["dropped_rows"] = self.dropped_rows
                break
            self.queue.pop(0)
        self._save_manifest()

    def _save_manifest(self) -> None:
        failures = self.failures_before + sum(self.runner_failures.values())
        for key, value in (("capture_failures", failures), ("driver_failures", self.driver_failures)):
            if value:
                self.manifest[key] = value
        if self.manifest == self._saved:
            return
        try:
            self.writer.write_manifest(self.manifest)
            self._saved = copy.deepcopy(self.manifest)
        except Exception:
            logger.exception("reward_audit: could not write the manifest of %s", self.location)
