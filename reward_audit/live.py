"""The audit while training runs: each ``train()`` result gets a ``reward_audit`` entry, so
TensorBoard, W&B, MLflow and Tune's ``result.json`` show the truth beside RLlib's own
curves, and a Tune stopper can end a leaking run::

    result["reward_audit"] = {
        "failing": 1,               # (phase, kind, key) with a wrong value so far
        "verified_episodes": 48,    # episodes with a value checked so far
        "truth": {"env_runners": {"module_episode_returns_mean": {"p0": 30.0}}},
    }
    # flattened by Tune: reward_audit/failing, reward_audit/truth/env_runners/...

    tune.Tuner(..., run_config=tune.RunConfig(stop={"reward_audit/failing": 1}))

The driver already holds each iteration's rows when it writes them (``collector.py``); the
live audit reconciles them there, episode by episode, as ``compare`` does: the truth is the
sum of the rewards RLlib counts (pre-observation rewards left out), a value is wrong when
it is further from the truth than the rounding bound of RLlib's own arithmetic. Its cost
is proportional to the iteration's rows. ``compare`` after the run is the full audit
(dashboards rebuilt exactly, explanations, attribution); the live numbers are a signal.

The truth of a dashboard series is reduced like RLlib reduces it (the run's
``smoothing_model``): ``per_call_window`` (new stack 2.4x+): per env runner and
``get_metrics()`` call the last ⌈S / runners⌉ episodes, then the mean over those;
``driver_history`` (old stack, 2.1x): the last max(S, new) episodes. APPO / IMPALA show
calls by arrival time: their truth series are left out (``compare`` rebuilds them).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

from .recorder import rounding_bound
from .schema import IterationSemantics as S
from .schema import Kind

logger = logging.getLogger("reward_audit")

KEEP_ITERATIONS = 5  # an episode half-seen (raw without report, or the reverse) is dropped after this many

_REDUCE = {
    S.MEAN_OF_EPISODE_SUMS.value: "mean",
    S.MEAN_OF_AGENT_EPISODES.value: "mean",
    S.MIN_OF_EPISODE_SUMS.value: "min",
    S.MIN_OF_AGENT_EPISODES.value: "min",
    S.MAX_OF_EPISODE_SUMS.value: "max",
    S.MAX_OF_AGENT_EPISODES.value: "max",
}


class _Episode:
    __slots__ = ("agents", "modules", "done", "reported", "seen")

    def __init__(self, seen: int):
        self.agents: dict[str, list] = {}  # agent -> [counted sum, n rewards, Σ|r|, fewest bits, chunks]
        self.modules: dict[str, str] = {}
        self.done = False
        self.reported: list[dict] = []
        self.seen = seen


class LiveAudit:
    def __init__(self, manifest: dict, run_location: str):
        self.location = run_location
        self.model = None if manifest.get("async_metrics") else manifest.get("smoothing_model")
        smoothing = int(manifest.get("metrics_num_episodes_for_smoothing") or 100)
        self.S = smoothing
        self.window = {
            "train": max(1, math.ceil(smoothing / max(int(manifest.get("num_env_runners") or 0), 1))),
            "evaluation": max(1, math.ceil(smoothing / max(int(manifest.get("evaluation_num_env_runners") or 0), 1))),
        }
        self.episodes: dict[tuple[str, str], _Episode] = {}
        self.failing: dict[tuple[str, str, str], str] = {}  # (phase, kind, key) -> first wrong value, in words
        self.verified = 0
        self.warned = False
        self.judged: list[dict] = []  # this iteration's checked values, in RLlib's order
        self.history: dict[tuple[str, str, str | None], deque] = {}  # driver_history: per series, the last S episodes' truths

    # ------------------------------------------------------------------ rows in

    def add(self, raw: list[dict], reported: list[dict], iteration: int) -> None:
        """One hand-over's rows (as the collector writes them)."""
        for row in raw:
            ep = self._episode(row, iteration)
            a = ep.agents.get(row["agent_id"])
            if a is None:
                a = ep.agents[row["agent_id"]] = [0.0, 0, 0.0, 53, 0]
            a[0] += row["reward"] - row["pre_obs_reward"]
            a[1] += row["n_rewards"]
            a[2] += abs(row["reward"]) + (row.get("reward_cancel") or 0.0)
            a[3] = min(a[3], row.get("reward_bits") or 53)
            a[4] += 1
            if row.get("module_id") is not None:
                ep.modules[row["agent_id"]] = row["module_id"]
            ep.done = ep.done or row["episode_done"]
        for row in reported:
            self._episode(row, iteration).reported.append(row)
        for key in [k for k, ep in self.episodes.items() if ep.done and ep.reported]:
            self._judge(self.episodes.pop(key))
        for key in [k for k, ep in self.episodes.items() if iteration - ep.seen >= KEEP_ITERATIONS]:
            del self.episodes[key]

    def _episode(self, row: dict, iteration: int) -> _Episode:
        key = (row["runner_id"], row["episode_id"])
        ep = self.episodes.get(key)
        if ep is None:
            ep = self.episodes[key] = _Episode(iteration)
        return ep

    def _judge(self, ep: _Episode) -> None:
        self.verified += 1
        for row in ep.reported:
            kind, agent, module = row["kind"], row["agent_id"], row["module_id"]
            if kind == Kind.AGENT.value:
                agents = [agent] if agent in ep.agents else []
            elif kind == Kind.MODULE.value:
                agents = [a for a, m in ep.modules.items() if m == module]
            elif kind == Kind.POLICY.value:
                agents = [agent] if ep.modules.get(agent) == module else []
            else:
                agents = list(ep.agents)
            parts = [ep.agents[a] for a in agents if a in ep.agents]
            truth = sum(p[0] for p in parts)
            bound = rounding_bound(
                sum(p[1] for p in parts), sum(p[2] for p in parts), min([p[3] for p in parts] or [53]), sum(p[4] for p in parts), len(parts)
            )
            value = row["value"]
            key = agent if kind == Kind.AGENT.value else (module if kind in (Kind.MODULE.value, Kind.POLICY.value) else None)
            self.judged.append({**row, "truth": truth, "series": (row["phase"], kind, key)})
            wrong = not math.isfinite(value) or abs(value - truth) > bound + 4 * 2.0**-53 * abs(truth)
            name = (row["phase"], kind, str(key) if key is not None else "return")
            if wrong and name not in self.failing:
                self.failing[name] = f"{name[0]} {name[1]} {name[2]}: RLlib reported {value:.6g} for episode {row['episode_id']} where the env paid {truth:.6g}"

    # ------------------------------------------------------------------ result out

    def result(self, iteration_rows: list[dict]) -> dict[str, Any]:
        """The ``reward_audit`` entry of this iteration's result; ``iteration_rows`` are the
        dashboard numbers RLlib showed (``Adapter.iteration_rows``)."""
        truth: dict[str, Any] = {}
        values = self._series_values()
        if self.model in ("per_call_window", "driver_history"):
            for row in iteration_rows:
                how = _REDUCE.get(row["semantics"])
                series = values.get((row["phase"], row["kind"], row["key"]))
                if how is None or not series:
                    continue
                reduced = self._reduce(row["phase"], series, how, (row["phase"], row["kind"], row["key"]))
                if reduced is not None:
                    node = truth
                    *parents, leaf = row["path"].split("/")
                    for p in parents:
                        node = node.setdefault(p, {})
                    node[leaf] = reduced
        self._advance(values)
        if self.failing and not self.warned:  # once, the first iteration something is wrong
            first, *more = self.failing.values()
            logger.warning(
                "reward_audit: wrong reward attribution — %s%s; run `reward-audit compare %s` for the evidence",
                first, f" (and {len(more)} more)" if more else "", self.location,
            )
            self.warned = True
        return {"failing": len(self.failing), "verified_episodes": self.verified, "truth": truth}

    def _series_values(self) -> dict[tuple, list[dict]]:
        out: dict[tuple, list[dict]] = {}
        for row in self.judged:
            out.setdefault(row["series"], []).append(row)
        return out

    @staticmethod
    def _per_episode(rows: list[dict]) -> list[list[float]]:
        """A series' truths grouped by episode, in RLlib's order (the driver's history keeps episodes)."""
        episodes: dict[tuple, list[float]] = {}
        for r in rows:
            episodes.setdefault((r["runner_id"], r["episode_id"]), []).append(r["truth"])
        return list(episodes.values())

    def _reduce(self, phase: str, rows: list[dict], how: str, series: tuple) -> float | None:
        pick = {"mean": lambda xs: sum(xs) / len(xs), "min": min, "max": max}[how]
        if self.model == "per_call_window":
            calls: dict[tuple, list[float]] = {}
            for r in rows:
                calls.setdefault((r["runner_id"], r["metrics_call"]), []).append(r["truth"])
            window = self.window.get(phase, self.window["train"])
            per_call = [pick(xs[-window:]) for xs in calls.values()]
            return pick(per_call) if per_call else None
        if phase == "evaluation":  # one evaluate() call's episodes
            return pick([r["truth"] for r in rows])
        # The driver's history: the last max(S, new) episodes (each with all its entries).
        new = self._per_episode(rows)
        history = list(self.history.get(series, ()))
        episodes = history[max(0, len(history) - max(0, self.S - len(new))):] + new if len(new) < self.S else new
        values = [x for ep in episodes for x in ep]
        return pick(values) if values else None

    def _advance(self, values: dict[tuple, list[dict]]) -> None:
        if self.model == "driver_history":
            for series, rows in values.items():
                if series[0] != "evaluation":
                    self.history.setdefault(series, deque(maxlen=self.S)).extend(self._per_episode(rows))
        self.judged = []
