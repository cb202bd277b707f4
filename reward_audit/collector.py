"""Driver-side collection: resolve the output folder, write the manifest, and once per
iteration drain every env runner's buffered rows (``foreach_env_runner``) into part files.

Runners never write: they may be remote actors on other nodes, built before the driver
knows the trial dir. The driver collects, so one folder (the trial dir Tune syncs) holds
everything, with no shared file system needed.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
import uuid
from typing import Any, Iterable

from .capture.base import ENV_VAR, Adapter, drain_runner
from .schema import AUDIT_DIR_NAME, MANIFEST_NAME, Phase
from .store import RunWriter, resolve_filesystem

logger = logging.getLogger("reward_audit")


def resolve_output(adapter: Adapter, algorithm: Any, explicit: str | None) -> tuple[str, Any, str]:
    """Where this run's audit folder goes, and why: ``(location, filesystem, source)``.

    1. ``$REWARD_AUDIT_DIR`` (a base folder; under Tune each trial gets a sub-folder);
    2. ``RewardAuditCallback.writing_to(path_or_uri)`` (same rule);
    3. Tune's trial dir, else the algorithm's log dir: ``<dir>/reward_audit``.
    A base folder that already holds a run gets a fresh ``run-<time>-<id>/`` sub-folder,
    so two runs never mix.
    """
    base, source = os.environ.get(ENV_VAR), f"${ENV_VAR}"
    if not base:
        base, source = explicit, "RewardAuditCallback.writing_to()"
    if not base:
        location, fs = adapter.default_output(algorithm)
        return location, fs, "trial dir" if getattr(algorithm, "_storage", None) is not None else "algorithm.logdir"
    trial = adapter.trial_name(algorithm)
    base = str(base).rstrip("/")
    location = f"{base}/{trial}/{AUDIT_DIR_NAME}" if trial else f"{base}/{AUDIT_DIR_NAME}"
    fs, path = resolve_filesystem(location)
    if fs.get_file_info(f"{path}/{MANIFEST_NAME}").type.name == "File":
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        fresh = f"{base}/run-{stamp}-{uuid.uuid4().hex[:6]}/{AUDIT_DIR_NAME}"
        logger.warning("reward_audit: %s already holds a run; writing this one to %s", location, fresh)
        location = fresh
    return location, None, source


class Collector:
    def __init__(self, adapter: Adapter, algorithm: Any, explicit: str | None, extra: dict[str, Any] | None = None):
        self.adapter = adapter
        location, fs, source = resolve_output(adapter, algorithm, explicit)
        self.writer = RunWriter(location, fs)
        self.location = location
        self.lock = threading.Lock()
        self.runner_failures: dict[str, int] = {}
        self.manifest = adapter.manifest(algorithm)
        self.manifest.update({"output": location, "output_source": source, **(extra or {})})
        self.writer.write_manifest(self.manifest)
        logger.info("reward_audit: recording to %s (%s)", location, source)

    def collect(self, algorithm: Any, iteration: int, phases: Iterable[Phase]) -> int:
        """Drain the runners of ``phases``; returns the number of raw rows written."""
        wanted = set(phases)
        written = 0
        for group, phase in self.adapter.runner_groups(algorithm):
            if phase not in wanted:
                continue
            results = [r for r in self.adapter.foreach_runner(group, drain_runner) if r]
            raw = [{**row, "iteration": iteration} for r in results for row in r["raw_rewards"]]
            reported = [{**row, "iteration": iteration} for r in results for row in r["reported_episodes"]]
            before = sum(self.runner_failures.values())
            for r in results:  # each runner reports its cumulative count
                self.runner_failures[r["runner_id"]] = r.get("failures", 0)
            failures = sum(self.runner_failures.values())
            tag = f"{iteration:06d}-{phase.value}"
            with self.lock:
                self.writer.write_rows("raw_rewards", raw, tag)
                self.writer.write_rows("reported_episodes", reported, tag)
                if failures != before:
                    self.manifest["capture_failures"] = failures
                    self.writer.write_manifest(self.manifest)
            written += len(raw)
        return written

    def record_result(self, result: dict, iteration: int) -> None:
        rows = self.adapter.iteration_rows(result, iteration)
        with self.lock:
            self.writer.write_rows("reported_iterations", rows, f"{iteration:06d}")
