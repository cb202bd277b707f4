"""Small multi-agent envs with known rewards, for the demo, the tests and the benchmark.

Both keep an independent ground truth: with ``env_config["ledger_dir"]`` set, every
finished episode appends one JSON line ``{"length": n, "sums": {agent: total}}`` to a
file of its own in that folder (works from remote env runners on this machine).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import gymnasium as gym
import numpy as np
from ray.rllib.env.multi_agent_env import MultiAgentEnv


class _Ledger:
    """The env's own count: per episode, every reward paid, and the part paid to an agent
    before or with its first observation (``pre_obs``)."""

    def __init__(self, folder: str | None):
        self.path = os.path.join(folder, f"ledger-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl") if folder else None
        self.reset({})

    def reset(self, obs: dict) -> None:
        self.sums: dict[Any, float] = {}
        self.pre_obs: dict[Any, float] = {}
        self.observed = set(obs)

    def add(self, rewards: dict, obs: dict) -> None:
        for aid, r in rewards.items():
            self.sums[aid] = self.sums.get(aid, 0.0) + float(r)
            if aid not in self.observed:
                self.pre_obs[aid] = self.pre_obs.get(aid, 0.0) + float(r)
        self.observed.update(obs)

    def close_episode(self, length: int) -> None:
        if self.path:
            line = {
                "length": length,
                "sums": {str(k): v for k, v in self.sums.items()},
                "pre_obs": {str(k): v for k, v in self.pre_obs.items()},
            }
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")


def _declare_spaces(env: MultiAgentEnv, obs_space: gym.Space, act_space: gym.Space) -> None:
    """Give every agent the same spaces, in the form each Ray version reads.

    * Ray 2.4x+: ``observation_spaces`` / ``action_spaces``, dicts keyed by agent id.
    * Ray 2.1x: ``observation_space`` / ``action_space`` as a ``gym.spaces.Dict`` keyed by
      agent id (RLlib's "preferred format"); the 2.12 experimental new stack fails without it
      (``AgentToModuleMapping._map_space_if_necessary``: ``'Box' object has no attribute
      'spaces'``). The flags skip 2.12's format probing; ``_agent_ids`` is what the 2.12
      old stack asks for. 2.4x+ treats these attributes as old-stack fall-backs.
    """
    env.observation_spaces = {aid: obs_space for aid in env.agents}
    env.action_spaces = {aid: act_space for aid in env.agents}
    env.observation_space = gym.spaces.Dict(env.observation_spaces)
    env.action_space = gym.spaces.Dict(env.action_spaces)
    env._obs_space_in_preferred_format = True
    env._action_space_in_preferred_format = True
    env._agent_ids = set(env.agents)


class ScaledRewardsEnv(MultiAgentEnv):
    """Every agent acts every step; agent i is paid ``scales[i]`` per step (times a random
    factor in [0.5, 1.5) if ``random_rewards``), whatever it does.

    env_config: ``agents`` (ids, ints or strings; default ``[0, 1]``), ``scales`` (default
    ``[1, 10, ...]``), ``episode_len`` (default 30), ``random_rewards``, ``ledger_dir``;
    ``crash_once``: a file path — the first env of a remote runner (worker index ≥ 1) that
    finds no file there creates it and raises at step 5 (tests of runner restarts).
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        remote = bool(getattr(config, "worker_index", 0))  # an EnvContext
        config = dict(config or {})
        self.agents = self.possible_agents = list(config.get("agents", [0, 1]))
        scales = config.get("scales") or [10.0**i for i in range(len(self.agents))]
        self.scales = {aid: float(s) for aid, s in zip(self.agents, scales)}
        self.episode_len = int(config.get("episode_len", 30))
        self.random_rewards = bool(config.get("random_rewards", False))
        self.rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
        _declare_spaces(self, gym.spaces.Box(0.0, 1.0, (2,), np.float32), gym.spaces.Discrete(2))
        self.ledger = _Ledger(config.get("ledger_dir"))
        self.crash_once = config.get("crash_once") if remote else None
        self.t = 0

    def _obs(self) -> dict:
        progress = np.float32(self.t / self.episode_len)
        return {aid: np.array([progress, 1.0], np.float32) for aid in self.agents}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.t = 0
        obs = self._obs()
        self.ledger.reset(obs)
        return obs, {}

    def step(self, action_dict: dict):
        self.t += 1
        if self.crash_once and self.t == 5:
            try:
                with open(self.crash_once, "x"):
                    pass
            except FileExistsError:
                self.crash_once = None
            else:
                raise RuntimeError("ScaledRewardsEnv: crash_once")
        rewards = {}
        for aid in self.agents:
            factor = self.rng.uniform(0.5, 1.5) if self.random_rewards else 1.0
            rewards[aid] = float(self.scales[aid] * factor)
        done = self.t >= self.episode_len
        obs = self._obs()
        self.ledger.add(rewards, obs)
        if done:
            self.ledger.close_episode(self.t)
        return obs, rewards, {"__all__": done}, {"__all__": False}, {}


class TurnBasedEnv(MultiAgentEnv):
    """Two players alternate; only the player to move gets an observation. Every step pays
    the mover ``+1 * factor`` and the waiting player ``-0.5 * factor`` — including on move 1,
    before the second player's first observation (RLlib never counts that reward).

    env_config: ``agents`` (default ``["white", "black"]``), ``episode_len`` (moves, default
    20), ``random_rewards``, ``ledger_dir``; ``final_obs``: who observes the last step,
    ``"all"`` (default) or ``"none"`` (as RLlib's ``OpenSpielEnv`` does).
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        config = dict(config or {})
        self.agents = self.possible_agents = list(config.get("agents", ["white", "black"]))
        self.episode_len = int(config.get("episode_len", 20))
        self.random_rewards = bool(config.get("random_rewards", False))
        self.final_obs = config.get("final_obs", "all")
        if self.final_obs not in ("all", "none"):
            raise ValueError(f"TurnBasedEnv: final_obs must be 'all' or 'none', got {self.final_obs!r}")
        self.rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
        _declare_spaces(self, gym.spaces.Box(0.0, 1.0, (2,), np.float32), gym.spaces.Discrete(2))
        self.ledger = _Ledger(config.get("ledger_dir"))
        self.t = 0

    def _obs_for(self, aid: Any) -> dict:
        return {aid: np.array([self.t / self.episode_len, 0.0], np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.t = 0
        obs = self._obs_for(self.agents[0])
        self.ledger.reset(obs)
        return obs, {}

    def step(self, action_dict: dict):
        mover = self.agents[self.t % 2]
        waiting = self.agents[(self.t + 1) % 2]
        self.t += 1
        factor = self.rng.uniform(0.5, 1.5) if self.random_rewards else 1.0
        rewards = {mover: 1.0 * factor, waiting: -0.5 * factor}
        done = self.t >= self.episode_len
        if done:
            obs = {aid: self._obs_for(aid)[aid] for aid in self.agents} if self.final_obs == "all" else {}
        else:
            obs = self._obs_for(waiting)
        self.ledger.add(rewards, obs)
        if done:
            self.ledger.close_episode(self.t)
        return obs, rewards, {"__all__": done}, {"__all__": False}, {}


# Mapping functions live in an importable module so remote env runners can unpickle them.
def map_by_id(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """Agent ``x`` -> module ``p_x``."""
    return f"p_{agent_id}"


def map_all_shared(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """Every agent -> module ``shared``."""
    return "shared"


def map_seats_by_episode(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """Self-play style: which of ``main`` / ``snapshot`` each agent plays depends on the episode."""
    import zlib

    episode_id = getattr(episode, "id_", None) or getattr(episode, "episode_id", 0)
    flip = zlib.crc32(str(episode_id).encode()) % 2
    return "main" if (int(agent_id) + flip) % 2 == 0 else "snapshot"


def map_four_policies_by_episode(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """Four policies, two seats, per episode: agent 0 plays ``p1`` and agent 1 plays ``p2``,
    except that the frozen ``p3`` takes agent 0's seat when ``crc32(episode id) % 10`` is
    0, 1 or 2, and the frozen ``p4`` takes agent 1's seat when it is 3, 4 or 5.

    The two frozen policies never sit together, so every episode feeds a trainable policy
    (Ray 2.12's new stack crashes on a train batch with no data for any trainable module).
    ``zlib.crc32`` rather than ``hash()``: ``hash`` of a string is salted per process, this
    is the same everywhere, so a seat can be re-derived by hand from a recorded episode id.
    Without an episode (RLlib probing spaces) the default seats are returned.
    """
    import zlib

    seat = 0 if str(agent_id) == "0" else 1
    # New stack: ``episode.id_``; old stack: ``episode.episode_id``.
    episode_id = getattr(episode, "id_", None) or getattr(episode, "episode_id", None) if episode is not None else None
    if episode_id is None:
        return ("p1", "p2")[seat]
    bucket = zlib.crc32(str(episode_id).encode()) % 10
    if seat == 0:
        return "p3" if bucket in (0, 1, 2) else "p1"
    return "p4" if bucket in (3, 4, 5) else "p2"
