"""Fault injection (self-test): corrupt RLlib's per-episode metric computation in the
running env runners the way real releases did, so a team can prove on the current Ray
that its pipeline catches a wrong attribution.

* ``leak`` — Ray 2.12 new stack: every (agent, module) value gets the *whole multi-agent*
  return of the episode's earlier chunks instead of its own earlier chunks.
* ``drop`` — Ray 2.53 new stack: a module shared by several agents keeps the final chunk of
  only the last of its agents (plus every agent's earlier chunks).
* ``mismatch`` — every module value is scaled by 1.01 and shifted by +0.5 (no agent's rewards
  explain it).
* ``signal`` — the training data, not the metrics: in every episode chunk ``sample()``
  returns, the first agent's rewards are moved onto the last reward of another agent (one
  mapped to a different module if there is one), so that module trains on rewards that are
  not its agents'. Done on deep copies inside the runner's ``_sample`` (before
  ``on_sample_end``): the episodes RLlib keeps for its metrics stay right, so only the
  audit's ``learning`` phase can see it.

Installed outside reward_audit's own capture wrappers, so what is captured *and* what the
dashboards show are the corrupted numbers, exactly as with the real bugs. New API stack
(Ray 2.4x – 2.60) only.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Any

import numpy as np

logger = logging.getLogger("reward_audit")

FAULTS = ("leak", "drop", "mismatch", "signal")


def _episode_parts(runner: Any, episode: Any) -> dict[str, Any]:
    """Per-agent final-chunk and earlier-chunk returns of one done episode, and its modules."""
    earlier_chunks = runner._ongoing_episodes_for_metrics.get(episode.id_, [])
    final = {str(aid): sa.get_return() for aid, sa in episode.agent_episodes.items()}
    module = {str(aid): sa.module_id for aid, sa in episode.agent_episodes.items()}
    earlier: dict[str, float] = defaultdict(float)
    for chunk in earlier_chunks:
        for aid, sa in chunk.agent_episodes.items():
            earlier[str(aid)] += sa.get_return()
            module.setdefault(str(aid), sa.module_id)
    whole_earlier = sum(chunk.get_return() for chunk in earlier_chunks)
    return {"final": final, "earlier": dict(earlier), "module": module, "whole_earlier": whole_earlier}


def _corrupt(fault: str, parts: dict[str, Any], agents: dict, modules: dict) -> tuple[dict, dict]:
    agents, modules = dict(agents), dict(modules)
    if fault == "leak":
        for aid in parts["module"]:
            extra = parts["whole_earlier"] - parts["earlier"].get(aid, 0.0)
            if aid in agents:
                agents[aid] += extra
            mid = parts["module"][aid]
            if mid in modules:
                modules[mid] += extra
    elif fault == "drop":
        by_module: dict[Any, list[str]] = defaultdict(list)
        for aid in parts["final"]:  # agent_episodes order, as RLlib 2.53 iterated it
            by_module[parts["module"][aid]].append(aid)
        for mid, aids in by_module.items():
            if mid in modules and len(aids) > 1:
                modules[mid] = parts["final"][aids[-1]] + sum(parts["earlier"].get(a, 0.0) for a in parts["module"] if parts["module"][a] == mid)
    elif fault == "mismatch":
        modules = {mid: value * 1.01 + 0.5 for mid, value in modules.items()}
    return agents, modules


def _move_rewards(episode: Any) -> None:
    """``signal``: move the first agent's rewards in this chunk onto another agent's last one."""
    agents = [(aid, sa) for aid, sa in episode.agent_episodes.items() if len(sa.get_rewards())]
    if len(agents) < 2:
        return
    (_, source), rest = agents[0], agents[1:]
    target = next((sa for _, sa in rest if sa.module_id != source.module_id), rest[-1][1])
    moved = float(np.sum(source.get_rewards(), dtype=np.float64))
    lookback = source.rewards.lookback
    for i in range(lookback, lookback + len(source.get_rewards())):
        source.rewards.data[i] = 0.0 * source.rewards.data[i]
    target.rewards.data[target.rewards.lookback + len(target.get_rewards()) - 1] += moved


def _install_signal(runner: Any) -> None:
    inner_sample = runner._sample

    def sample(*args: Any, **kwargs: Any) -> Any:
        episodes = copy.deepcopy(inner_sample(*args, **kwargs))  # RLlib's metrics keep the originals
        for episode in episodes:
            _move_rewards(episode)
        return episodes

    runner._sample = sample


def install_fault(runner: Any, fault: str) -> None:
    """Wrap the runner's ``get_metrics`` / ``_log_episode_metrics`` (outermost) with ``fault``;
    ``signal``: its ``_sample`` (private, self-test only)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; use one of {', '.join(FAULTS)}")
    if runner.__dict__.get("_reward_audit_fault"):
        return
    if fault == "signal":
        _install_signal(runner)
        runner.__dict__["_reward_audit_fault"] = fault
        logger.warning("reward_audit: fault 'signal' INJECTED into the training data of this env runner (self-test)")
        return
    inner_get_metrics, inner_log = runner.get_metrics, runner._log_episode_metrics
    queue: list[dict[str, Any]] = []

    def get_metrics(*args: Any, **kwargs: Any) -> Any:
        queue[:] = [_episode_parts(runner, e) for e in runner._done_episodes_for_metrics]
        return inner_get_metrics(*args, **kwargs)

    def log_episode_metrics(length: Any, ret: Any, sec: Any, agents: Any = None, modules: Any = None, *args: Any, **kwargs: Any) -> Any:
        if queue and agents is not None:
            agents, modules = _corrupt(fault, queue.pop(0), agents, modules or {})
        return inner_log(length, ret, sec, agents, modules, *args, **kwargs)

    runner.get_metrics = get_metrics
    runner._log_episode_metrics = log_episode_metrics
    runner.__dict__["_reward_audit_fault"] = fault
    logger.warning("reward_audit: fault %r INJECTED into RLlib's per-episode metrics on this env runner (self-test)", fault)
