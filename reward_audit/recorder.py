"""Runner-side recording, version-agnostic: what the env paid, attributed to episodes and
chunks using public hooks only; plus the per-episode returns RLlib reported.

One ``RunnerRecorder`` lives in each env-runner process (attached to the runner object).
The capture adapters (``capture/``) feed it; the driver drains it once per iteration.

Attributing tapped rewards to episodes (docs/ray_versions.md):

* the tap adds each ``step()``'s rewards to ``pending[env_index]``, except a reward paid
  to an agent that is not in that step's observations (a turn-based game pays the waiting
  player): it is held in ``waiting[env_index]`` until the agent's next observation, its
  own ``terminated`` / ``truncated`` or ``__all__`` (then into ``pending``), because RLlib
  books it there — possibly in a later chunk than the ``step()`` that paid it (2.60
  ``MultiAgentEpisode.add_env_step``: ``_hanging_rewards_end``, carried into the successor by
  ``cut()``; the old stack's ``_MultiAgentEnvState.last_rewards`` likewise);
* ``on_episode_step`` / ``on_episode_end`` for that index move ``pending`` into the episode
  they receive;
* if ``on_episode_created`` / ``on_episode_start`` arrives while ``pending`` (or ``waiting``)
  is not empty, those rewards belong to the previous episode on that index (an abandoned
  tail); a reset or the episode's end releases ``waiting`` into ``pending`` as well;
* ``on_sample_end`` moves whatever is left into the current episode of each index, then
  turns every episode touched in this ``sample()`` call into chunk rows; ``waiting`` stays.
Only the chunk a reward is filed in depends on ``waiting``: an episode's sums do not.

A reward is *pre-observation* if the agent was not in the reset observation nor in any
observation returned before that step (RLlib never counts those: docs/ray_versions.md).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any, Callable, Hashable, Iterable

import numpy as np

from .schema import Kind, Phase, Semantics

logger = logging.getLogger("reward_audit")

AgentId = Hashable
# [reward sum, n rewards, pre-obs sum, n pre-obs, reward compensation, Σ|r|, fewest significand
#  bits, pre-obs compensation, Σ clip(r) of counted rewards, its compensation]: sums are
# Neumaier-compensated, so sum + compensation is the exact sum rounded once, whatever the
# order and magnitudes of the rewards.
Acc = list
_BITS = {2: 11, 4: 24}  # itemsize of a float dtype -> significand bits (8 bytes: 53)


def _bits(value: Any) -> int:
    """Significand bits of a reward's type: RLlib sums the rewards in that precision."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and dtype.kind == "f":
        return _BITS.get(dtype.itemsize, 53)
    return 53


def _add(a: Acc, i: int, c: int, x: float) -> None:
    """Neumaier's compensated ``a[i] += x`` (compensation kept in ``a[c]``)."""
    s = a[i]
    t = s + x
    if abs(s) >= abs(x):
        a[c] += (s - t) + x
    else:
        a[c] += (x - t) + s
    a[i] = t


def _round_up_f32(x: float) -> float:
    """``x ≥ 0`` as the nearest float32 not below it (an upper bound, in 4 bytes)."""
    if x <= 0.0:
        return 0.0
    f = float(np.float32(x))
    return f if f >= x else float(np.nextafter(np.float32(x), np.float32(np.inf)))


BUFFER_ENV_VAR = "REWARD_AUDIT_MAX_BUFFERED_ROWS"
DEFAULT_MAX_BUFFERED_ROWS = 1_000_000  # raw rows per runner between two drains (~0.5 KB each)


def max_buffered_rows() -> int:
    """The runner buffer's limit: ``$REWARD_AUDIT_MAX_BUFFERED_ROWS`` or 1,000,000 raw rows
    (one row per agent per episode per ``sample()`` call; a PPO iteration of 4,000 steps
    with 2 agents makes a few hundred). Past it whole episodes are dropped and counted."""
    try:
        return max(1, int(os.environ.get(BUFFER_ENV_VAR, DEFAULT_MAX_BUFFERED_ROWS)))
    except ValueError:
        logger.error("reward_audit: $%s=%r is not an integer; using %d", BUFFER_ENV_VAR, os.environ[BUFFER_ENV_VAR], DEFAULT_MAX_BUFFERED_ROWS)
        return DEFAULT_MAX_BUFFERED_ROWS


def rounding_bound(n: Any, abs_sum: Any, bits: Any, chunks: Any, agents: Any, unknown: Any = None) -> Any:
    """The rounding bound of a sum of rewards done RLlib's way, from what the recorder keeps
    (``n_rewards``, Σ|r|, ``reward_bits``), less the part that depends on the truth; NaN
    where Σ|r| is ``unknown``. RLlib adds the n rewards one by one (per chunk, then chunk
    returns, then a module's agents) in the rewards' own precision, so with m = n + 2·(chunks
    + agents) + 4 additions and unit roundoff u = 2^-bits the error is at most
    γ_m·Σ|r| ≈ 1.01·m·u·Σ|r| (Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2).
    Takes numpy arrays (``tally``) or Python numbers (``live``, one value at a time, where a
    numpy call would cost more than the arithmetic)."""
    m = n + 2 * (chunks + agents) + 4
    out = 1.01 * m * 2.0 ** -bits * abs_sum
    return out if unknown is None else np.where(unknown, np.nan, out)


def _new_acc() -> Acc:
    return [0.0, 0, 0.0, 0, 0.0, 0.0, 53, 0.0, 0.0, 0.0]


def clip_function(setting: Any) -> Callable[[float], float] | None:
    """RLlib's ``ClipRewardAgentConnector``: ``True`` -> sign, a float c -> clip to [-c, c];
    anything else (``None``, ``False``, an ``int``) clips nothing."""
    if setting is True or setting == "sign":
        return lambda r: (r > 0) - (r < 0) + 0.0
    if type(setting) is float:
        return lambda r: max(-setting, min(setting, r))
    return None


class _Episode:
    __slots__ = ("episode_id", "env_index", "acc", "mapping", "done", "source")

    def __init__(self, episode_id: str, env_index: int):
        self.episode_id = episode_id
        self.env_index = env_index
        self.acc: dict[AgentId, Acc] = {}
        self.mapping: dict[AgentId, str] = {}
        self.done = False
        self.source: Any = None  # the RLlib episode object, to read the mapping lazily


def _done(flags: Any) -> set:
    """The agent ids (and ``__all__``) a ``terminateds`` / ``truncateds`` dict marks done."""
    return {aid for aid, flag in flags.items() if flag} if isinstance(flags, dict) else set()


def _merge(into: dict[AgentId, Acc], other: dict[AgentId, Acc]) -> None:
    for aid, b in other.items():
        a = into.get(aid)
        if a is None:
            into[aid] = list(b)
            continue
        for i, c, x in ((0, 4, b[0]), (0, 4, b[4]), (2, 7, b[2]), (2, 7, b[7]), (8, 9, b[8]), (8, 9, b[9])):
            _add(a, i, c, x)
        a[1] += b[1]
        a[3] += b[3]
        a[5] += b[5]
        a[6] = min(a[6], b[6])


class RunnerRecorder:
    """Aggregates in memory; ``drain()`` hands rows to the driver and forgets them."""

    def __init__(self, phase: Phase, worker_index: int, mapping_of: Callable[[Any], dict]):
        self.phase = phase.value
        self.worker_index = int(worker_index or 0)
        self.runner_id = f"{self.phase}/{self.worker_index}/{uuid.uuid4().hex[:8]}"
        self.pid = os.getpid()
        self._mapping_of = mapping_of
        self._lock = threading.Lock()
        self._pending: dict[int, dict[AgentId, Acc]] = {}
        self._observed: dict[int, set] = {}
        self._waiting: dict[int, dict[AgentId, Acc]] = {}  # paid while the agent waited (see module doc)
        self._current: dict[int, _Episode] = {}
        self._touched: dict[str, _Episode] = {}
        self.sample_seq = 0
        self.metrics_call = 0
        self._metrics_ids: list[str] = []
        self._raw_rows: list[dict] = []
        self._reported_rows: list[dict] = []
        self._batch_rows: list[dict] = []  # what sample() handed to training (batch_rewards)
        # Old stack: episode id -> [RLlib's live {agent id: agent_index} dict, ended], to name
        # the agents of a batch's `agent_index` column (capture/oldstack.py).
        self.agent_indices: dict[str, list] = {}
        self.failures = 0
        # Hand-over accounting (``drain``): the driver sees gaps, restarts and drops.
        self.max_buffered_rows = max_buffered_rows()
        self._drain_seq = 0
        self._raw_total = 0  # rows produced since the runner started, dropped ones included
        self._reported_total = 0
        self._dropped_raw = 0
        self._dropped_reported = 0
        self._dropped: set[str] = set()  # episodes dropped whole (buffer full)
        self._dropped_new: list[str] = []  # ... since the last drain
        self.clip: Callable[[float], float] | None = None  # RLlib's reward clipping, if on (old stack)

    # ------------------------------------------------------------------ the tap

    def tap_reset(self, env_index: int, obs: Any) -> None:
        self._release_waiting(env_index)  # the previous episode's; a reset ends it
        self._observed[env_index] = set(obs.keys()) if isinstance(obs, dict) else set()

    def tap_step(self, env_index: int, obs: Any, rewards: Any, terminateds: Any = None, truncateds: Any = None) -> None:
        observed = self._observed.setdefault(env_index, set())
        pending = self._pending.setdefault(env_index, {})
        waiting = self._waiting.setdefault(env_index, {})
        sees = obs if isinstance(obs, dict) else {}
        for aid, value in rewards.items():
            r = float(value)
            pre = aid not in observed
            # Paid while the agent waits: RLlib books it with the agent's next observation.
            into = waiting if not pre and aid not in sees else pending
            a = into.get(aid)
            if a is None:
                a = into[aid] = _new_acc()
            _add(a, 0, 4, r)
            a[1] += 1
            a[5] += abs(r)
            if type(value) is not float:
                a[6] = min(a[6], _bits(value))
            if pre:
                _add(a, 2, 7, r)
                a[3] += 1
            elif self.clip is not None:
                _add(a, 8, 9, self.clip(r))
        if waiting:
            done = _done(terminateds) | _done(truncateds)
            for aid in [aid for aid in waiting if aid in sees or aid in done or "__all__" in done]:
                _merge(pending, {aid: waiting.pop(aid)})
        if sees:
            observed.update(sees.keys())

    def _release_waiting(self, env_index: int) -> None:
        """The episode on ``env_index`` ends: what its agents were paid while waiting is its own."""
        waiting = self._waiting.get(env_index)
        if waiting:
            _merge(self._pending.setdefault(env_index, {}), waiting)
            waiting.clear()

    # ------------------------------------------------------------------ episode hooks

    def _state(self, episode_id: str, env_index: int, source: Any) -> _Episode:
        state = self._current.get(env_index)
        if state is None or state.episode_id != episode_id:
            state = self._touched.get(episode_id) or _Episode(episode_id, env_index)
            self._current[env_index] = state
        if source is not None:
            state.source = source
        return state

    def _flush_pending(self, env_index: int, state: _Episode | None) -> None:
        pending = self._pending.get(env_index)
        if not pending:
            return
        if state is None:  # rewards with no episode to own them: keep them visible
            state = _Episode(f"orphan-{uuid.uuid4().hex[:12]}", env_index)
            logger.warning("reward_audit: rewards on env %d arrived outside any episode; recorded as %s", env_index, state.episode_id)
        _merge(state.acc, pending)
        pending.clear()
        self._touched[state.episode_id] = state

    def episode_begins(self, episode_id: str, env_index: int, source: Any) -> None:
        """``on_episode_created`` / ``on_episode_start``: leftover rewards are the previous episode's tail."""
        previous = self._current.get(env_index)
        if previous is not None and previous.episode_id != episode_id:
            self._release_waiting(env_index)
            self._flush_pending(env_index, previous)
        self._state(episode_id, env_index, source)

    def episode_step(self, episode_id: str, env_index: int, source: Any) -> None:
        self._flush_pending(env_index, self._state(episode_id, env_index, source))

    def episode_ends(self, episode_id: str, env_index: int, source: Any, mapping: dict | None = None) -> None:
        state = self._state(episode_id, env_index, source)
        self._release_waiting(env_index)
        self._flush_pending(env_index, state)
        state.done = True
        self._touched[episode_id] = state
        state.mapping.update(mapping if mapping is not None else self._read_mapping(state))
        state.source = None

    def _read_mapping(self, state: _Episode) -> dict:
        if state.source is None:
            return {}
        try:
            return self._mapping_of(state.source)
        except Exception:  # never let a private attribute change break the run
            logger.exception("reward_audit: could not read the agent->module mapping of episode %s", state.episode_id)
            return {}

    def sample_ends(self, hold_pending: bool = False) -> None:
        """``on_sample_end``: cut every touched episode into one chunk row per agent.

        ``hold_pending``: rewards tapped after the last episode hook belong to the *next*
        ``sample()`` call (the old stack steps the env after that step's hooks), so keep them
        pending instead of filing them in this chunk.
        """
        if not hold_pending:
            for env_index in list(self._pending):
                self._flush_pending(env_index, self._current.get(env_index))
        for state in self._touched.values():
            if not state.done:
                state.mapping.update(self._read_mapping(state))
            rows = self._raw_rows
            if state.episode_id in self._dropped or len(rows) + len(state.acc) > self.max_buffered_rows:
                rows = self._drop_episode(state.episode_id, len(state.acc))
            for aid, (r, n, pr, pn, rc, r_abs, bits, pc, clipped, cc) in state.acc.items():
                module = state.mapping.get(aid)
                rows.append(
                    {
                        "phase": self.phase,
                        "runner_id": self.runner_id,
                        "worker_index": self.worker_index,
                        "env_index": state.env_index,
                        "episode_id": state.episode_id,
                        "chunk_seq": self.sample_seq,
                        "agent_id": str(aid),
                        "agent_id_type": type(aid).__name__,
                        "module_id": None if module is None else str(module),
                        "reward": r + rc,
                        "n_rewards": n,
                        "pre_obs_reward": pr + pc,
                        "n_pre_obs": pn,
                        "reward_cancel": _round_up_f32(r_abs - abs(r + rc)),
                        "reward_bits": bits,
                        "reward_clipped": None if self.clip is None else clipped + cc,
                        "episode_done": state.done,
                    }
                )
            self._raw_total += len(state.acc)
            state.acc = {}
        # Done episodes are finished; ongoing ones keep their state via _current.
        self._touched = {}
        for env_index, state in list(self._current.items()):
            if state.done:
                del self._current[env_index]
        self.sample_seq += 1

    def _drop_episode(self, episode_id: str, n_rows: int) -> list:
        """The buffer is full: drop this episode's rows from now on, and its reported values.
        Its id goes to the driver (``drains.dropped_episode_ids``), and the audit leaves every
        row of it out — chunks handed over earlier too — and says INCOMPLETE."""
        if episode_id not in self._dropped:
            self._dropped.add(episode_id)
            self._dropped_new.append(episode_id)
            if len(self._dropped) == 1:
                logger.error(
                    "reward_audit: %d rows buffered on runner %s (limit $%s=%d) — is the driver draining? "
                    "Dropping whole episodes from now on; the audit will say INCOMPLETE",
                    len(self._raw_rows), self.runner_id, BUFFER_ENV_VAR, self.max_buffered_rows,
                )
        self._dropped_raw += n_rows
        return []  # rows appended here are discarded

    # ------------------------------------------------------------------ reported values

    def metrics_call_begins(self, episode_ids: Iterable[str]) -> None:
        self._metrics_ids = list(episode_ids)

    def reported_episode(
        self,
        episode_id: str | None,
        episode_return: float | None,
        agents: dict | None,
        modules: dict | None,
        policies: dict | None = None,
        metrics_call: int | None = None,
    ) -> None:
        """Record RLlib's per-episode numbers. ``episode_id=None`` takes the next id of the
        current ``get_metrics()`` call (RLlib logs episodes in the order it stored them)."""
        if episode_id is None:
            if not self._metrics_ids:
                self.failures += 1
                logger.error("reward_audit: RLlib reported more episodes than it had stored; value not recorded")
                return
            episode_id = self._metrics_ids.pop(0)
        if episode_id in self._dropped:
            self._dropped_reported += 1
            return
        call = self.metrics_call if metrics_call is None else metrics_call
        base = {"phase": self.phase, "runner_id": self.runner_id, "episode_id": episode_id, "semantics": Semantics.EPISODE_SUM_COUNTED.value, "metrics_call": call}
        rows = self._reported_rows
        if episode_return is not None:
            rows.append({**base, "kind": Kind.EPISODE.value, "agent_id": None, "module_id": None, "value": float(episode_return)})
        for aid, value in (agents or {}).items():
            rows.append({**base, "kind": Kind.AGENT.value, "agent_id": str(aid), "module_id": None, "value": float(value)})
        for mid, value in (modules or {}).items():
            rows.append({**base, "kind": Kind.MODULE.value, "agent_id": None, "module_id": str(mid), "value": float(value)})
        for (aid, pid), value in (policies or {}).items():
            rows.append({**base, "kind": Kind.POLICY.value, "agent_id": str(aid), "module_id": str(pid), "value": float(value)})
        self._reported_total += 1

    # ------------------------------------------------------------------ training data

    def batch_rewards(self, sums: Iterable[tuple[str, Any, Any, float, int, int]]) -> None:
        """``on_sample_end``: per ``(episode id, agent id, module id, reward sum, n, significand
        bits of the batch's rewards)`` what
        this ``sample()`` call hands to training (``chunk_seq`` = this call, as the raw
        rows). Call before ``sample_ends``, which advances the call number."""
        base = {"phase": self.phase, "runner_id": self.runner_id, "chunk_seq": self.sample_seq}
        rows = self._batch_rows
        full = len(rows) > self.max_buffered_rows  # the driver is not draining
        for episode_id, aid, mid, total, n, bits in sums:
            if full:  # dropped whole, like its raw rows: the audit leaves it out (INCOMPLETE)
                self._drop_episode(episode_id, 0)
            if episode_id in self._dropped:
                continue
            rows.append(
                {**base, "episode_id": episode_id, "agent_id": str(aid), "module_id": None if mid is None else str(mid), "reward": float(total), "n_rewards": int(n), "reward_bits": bits}
            )

    def metrics_call_ends(self) -> None:
        if self._metrics_ids:
            self.failures += 1
            logger.error("reward_audit: %d stored episodes were not reported by get_metrics(); they will show as INCOMPLETE", len(self._metrics_ids))
        self._metrics_ids = []
        self.metrics_call += 1

    # ------------------------------------------------------------------ hand-over

    def drain(self) -> dict[str, Any]:
        """Hand over the buffered rows with this runner's running totals: the driver writes
        one ``drains`` row per call, from which the audit finds lost hand-overs (a gap in
        ``drain_seq``), restarted runners (a new ``runner_id`` at the same worker index) and
        dropped episodes. ``reported_total`` counts episodes, not rows."""
        with self._lock:
            raw, reported, dropped, batch = self._raw_rows, self._reported_rows, self._dropped_new, self._batch_rows
            self._raw_rows, self._reported_rows, self._dropped_new, self._batch_rows = [], [], [], []
            seq, self._drain_seq = self._drain_seq, self._drain_seq + 1
        return {
            "runner_id": self.runner_id,
            "phase": self.phase,
            "worker_index": self.worker_index,
            "pid": self.pid,
            "drain_seq": seq,
            "raw_rewards": raw,
            "reported_episodes": reported,
            "batch_rewards": batch,
            "raw_total": self._raw_total,
            "reported_total": self._reported_total,
            "dropped_raw": self._dropped_raw,
            "dropped_reported": self._dropped_reported,
            "dropped_episode_ids": dropped,
            "failures": self.failures,
        }
