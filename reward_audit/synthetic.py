"""Synthetic runs in the exact store format, at any size: for benchmarks and tests.

A generated run looks like a Ray 2.60 new-stack run with remote env runners: every runner
calls ``sample()`` once per iteration (one chunk), episodes last 1–``max_chunks`` chunks
and so span neighbouring iterations, and the driver writes one part per iteration per
phase per table, as ``Collector`` does. RLlib's per-episode values are exact sums of the
env's rewards unless a fault is injected, and each iteration's dashboard numbers are built
the way RLlib 2.60 builds them (nan-mean of per-(runner, ``get_metrics()`` call) means).

    >>> from reward_audit.synthetic import generate_run
    >>> generate_run("/tmp/big", iterations=100, episodes_per_iteration=6250, agents=8)
    SyntheticRun(path='/tmp/big/reward_audit', raw_rows=..., episodes=..., ...)

Faults (``inject``), on a deterministic fraction of the multi-chunk episodes:

* ``leak`` — module ``p0`` also reports the other agents' earlier-chunk rewards (Ray 2.12);
* ``drop`` — every shared module reports only its last agent's final chunk plus all its
  agents' earlier chunks (Ray 2.53); needs ``modules < agents``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from . import schema
from .store import RunWriter

S = 100  # metrics_num_episodes_for_smoothing


@dataclass(frozen=True)
class SyntheticRun:
    path: str
    raw_rows: int
    reported_rows: int
    episodes: int
    injected_episodes: int
    parts: int


def manifest(runners: int, modules: list[str], inject: str | None) -> dict:
    return {
        "tool": schema.TOOL_NAME,
        "schema_version": schema.SCHEMA_VERSION,
        "reward_audit_version": "synthetic",
        "ray_version": "2.60.0",
        "api_stack": "new",
        "adapter": "new-stack-2.4x+",
        "algorithm": "PPO",
        "env": "reward_audit.synthetic",
        "policies": modules,
        "policies_to_train": None,
        "policy_mapping_fn": "reward_audit.synthetic.mapping",
        "rollout_fragment_length": 16,
        "metrics_num_episodes_for_smoothing": S,
        "num_env_runners": runners,
        "num_envs_per_env_runner": 1,
        "evaluation_interval": None,
        "iteration_semantics": {
            "env_runners/agent_episode_returns_mean/": "mean_of_episode_sums",
            "env_runners/episode_return_mean": "mean_of_episode_sums",
            "env_runners/module_episode_returns_mean/": "mean_of_episode_sums",
        },
        "iteration_paths": [
            ["env_runners/episode_return_mean", "episode", "mean_of_episode_sums"],
            ["env_runners/module_episode_returns_mean/", "module", "mean_of_episode_sums"],
            ["env_runners/agent_episode_returns_mean/", "agent", "mean_of_episode_sums"],
        ],
        "smoothing_model": "per_call_window",
        "evaluation_discards_last_call": False,
        "created_at": "2026-11-27T00:00:00+00:00",
        "injected_fault": inject,
    }


def _episode_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """uuid4-like 32-hex-digit ids, as RLlib's ``episode.id_``."""
    raw = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64).view(np.uint64)
    return np.char.add(np.char.zfill(np.char.mod("%x", raw[:, 0]), 16), np.char.zfill(np.char.mod("%x", raw[:, 1]), 16))


def _iterations(
    iterations: int, episodes_per_iteration: int, agents: int, modules: int, runners: int, max_chunks: int, inject: str | None, inject_every: int, seed: int
) -> Iterator[tuple[int, pa.Table, pa.Table, pa.Table, int]]:
    """Per iteration: (iteration, raw, reported episodes, reported iterations, injected)."""
    rng = np.random.default_rng(seed)
    runner_ids = np.array([f"train/{w + 1}/{w + 1:08x}" for w in range(runners)])
    agent_ids = np.array([str(a) for a in range(agents)])
    module_of = np.array([f"p{a % modules}" for a in range(agents)])
    scale = 10.0 ** (np.arange(agents) % 3)
    per_runner = max(1, episodes_per_iteration // runners)
    window = math.ceil(S / runners)
    pending: list[dict] = []  # raw chunk rows of episodes still running, by iteration
    for it in range(1, iterations + 1):
        n = per_runner * runners
        runner = np.repeat(np.arange(runners), per_runner)
        chunks = rng.integers(1, max_chunks + 1, size=n)
        ids = _episode_ids(rng, n)
        rewards = rng.normal(1.0, 0.3, size=(n, max_chunks, agents)) * scale * 16
        # Episodes start at this iteration's sample() and end at chunk `chunks - 1`.
        for c in range(max_chunks):
            live = chunks > c
            pending.append({"iteration": it + c, "chunk": c, "rows": live.nonzero()[0], "ids": ids, "runner": runner, "chunks": chunks, "rewards": rewards})
        now = [p for p in pending if p["iteration"] == it]
        pending = [p for p in pending if p["iteration"] != it]
        raw_parts, rep_parts = [], []
        injected = 0
        for p in now:
            rows = p["rows"]
            if not len(rows):
                continue
            k = len(rows)
            done = p["chunks"][rows] == p["chunk"] + 1
            r = p["rewards"][rows, p["chunk"], :]  # (k, agents)
            raw_parts.append(
                {
                    "runner": np.repeat(p["runner"][rows], agents),
                    "episode_id": np.repeat(p["ids"][rows], agents),
                    "chunk_seq": np.full(k * agents, it - 1, dtype=np.int64),
                    "agent": np.tile(np.arange(agents), k),
                    "reward": r.reshape(-1),
                    "done": np.repeat(done, agents),
                }
            )
            fin = rows[done]
            if not len(fin):
                continue
            c = p["chunk"]
            total = p["rewards"][fin, : c + 1, :]  # every chunk of the finished episodes
            per_agent = total.sum(axis=1)  # (f, agents), summed chunk by chunk in order
            earlier = total[:, :c, :].sum(axis=1)
            final = total[:, c, :]
            per_module = np.stack([per_agent[:, module_of == m].sum(axis=1) for m in np.unique(module_of)], axis=1)
            if inject and c > 0:
                hit = (np.arange(len(fin)) % inject_every) == 0
                injected += int(hit.sum())
                mods = list(np.unique(module_of))
                if inject == "leak":
                    others = module_of != "p0"
                    per_module[hit, mods.index("p0")] += earlier[hit][:, others].sum(axis=1)
                elif inject == "drop":
                    for j, m in enumerate(mods):
                        own = np.nonzero(module_of == m)[0]
                        if len(own) > 1:
                            per_module[hit, j] = final[hit][:, own[-1]] + earlier[hit][:, own].sum(axis=1)
            episode_return = per_agent.sum(axis=1)
            rep_parts.append({"runner": p["runner"][fin], "ids": p["ids"][fin], "agents": per_agent, "modules": per_module, "return": episode_return, "mods": np.unique(module_of)})
        if raw_parts:
            raw = {k: np.concatenate([p[k] for p in raw_parts]) for k in raw_parts[0]}
            m = len(raw["reward"])
            raw_table = pa.table(
                {
                    "phase": pa.array(np.full(m, "train")),
                    "runner_id": pa.array(runner_ids[raw["runner"]]),
                    "worker_index": pa.array((raw["runner"] + 1).astype(np.int32)),
                    "env_index": pa.array(np.zeros(m, dtype=np.int32)),
                    "episode_id": pa.array(raw["episode_id"]),
                    "chunk_seq": pa.array(raw["chunk_seq"]),
                    "agent_id": pa.array(agent_ids[raw["agent"]]),
                    "agent_id_type": pa.array(np.full(m, "int")),
                    "module_id": pa.array(module_of[raw["agent"]]),
                    "reward": pa.array(raw["reward"]),
                    "n_rewards": pa.array(np.full(m, 16, dtype=np.int32)),
                    "pre_obs_reward": pa.array(np.zeros(m)),
                    "n_pre_obs": pa.array(np.zeros(m, dtype=np.int32)),
                    "episode_done": pa.array(raw["done"]),
                    "iteration": pa.array(np.full(m, it, dtype=np.int64)),
                    "reward_cancel": pa.array(np.zeros(m, dtype=np.float32)),
                    "reward_bits": pa.array(np.full(m, 53, dtype=np.int32)),
                    "reward_clipped": pa.nulls(m, pa.float64()),
                },
                schema=schema.RAW_REWARDS,
            )
        else:
            raw_table = schema.RAW_REWARDS.empty_table()
        rep_table, dash_table = _reported(it, rep_parts, runner_ids, agent_ids, window)
        yield it, raw_table, rep_table, dash_table, injected


def _reported(it: int, parts: list[dict], runner_ids: np.ndarray, agent_ids: np.ndarray, window: int) -> tuple[pa.Table, pa.Table]:
    if not parts:
        return schema.REPORTED_EPISODES.empty_table(), schema.REPORTED_ITERATIONS.empty_table()
    runner = np.concatenate([p["runner"] for p in parts])
    ids = np.concatenate([p["ids"] for p in parts])
    agents = np.concatenate([p["agents"] for p in parts])
    modules = np.concatenate([p["modules"] for p in parts])
    ret = np.concatenate([p["return"] for p in parts])
    mods = parts[0]["mods"]
    # RLlib logs episodes per runner in the order they finished: runner-major here.
    order = np.argsort(runner, kind="stable")
    runner, ids, agents, modules, ret = runner[order], ids[order], agents[order], modules[order], ret[order]
    n, a, m = len(ids), agents.shape[1], modules.shape[1]
    per_ep = 1 + a + m
    kind = np.array(["episode"] + ["agent"] * a + ["module"] * m)
    agent_col = np.array([None] + list(agent_ids) + [None] * m, dtype=object)
    module_col = np.array([None] + [None] * a + list(mods), dtype=object)
    values = np.concatenate([ret[:, None], agents, modules], axis=1)
    rep = pa.table(
        {
            "phase": pa.array(np.full(n * per_ep, "train")),
            "runner_id": pa.array(np.repeat(runner_ids[runner], per_ep)),
            "episode_id": pa.array(np.repeat(ids, per_ep)),
            "kind": pa.array(np.tile(kind, n)),
            "agent_id": pa.array(np.tile(agent_col, n), type=pa.string()),
            "module_id": pa.array(np.tile(module_col, n), type=pa.string()),
            "value": pa.array(values.reshape(-1)),
            "semantics": pa.array(np.full(n * per_ep, schema.Semantics.EPISODE_SUM_COUNTED.value)),
            "metrics_call": pa.array(np.full(n * per_ep, it - 1, dtype=np.int64)),
            "iteration": pa.array(np.full(n * per_ep, it, dtype=np.int64)),
        },
        schema=schema.REPORTED_EPISODES,
    )
    # Dashboard: each runner's one get_metrics() call keeps its last `window` episodes;
    # the iteration shows the mean of the per-runner means.
    starts = np.searchsorted(runner, np.unique(runner))
    ends = np.append(starts[1:], n)
    keep = np.concatenate([np.arange(max(s, e - window), e) for s, e in zip(starts, ends)])
    calls = np.repeat(np.arange(len(starts)), [e - max(s, e - window) for s, e in zip(starts, ends)])
    cols = ["env_runners/episode_return_mean"] + [f"env_runners/agent_episode_returns_mean/{x}" for x in agent_ids] + [f"env_runners/module_episode_returns_mean/{x}" for x in mods]
    shown = []
    for j in range(per_ep):
        v = values[keep, j]
        shown.append(float(np.mean([np.mean(v[calls == c]) for c in range(len(starts))])))
    dash = pa.table(
        {
            "phase": ["train"] * per_ep,
            "iteration": [it] * per_ep,
            "path": cols,
            "kind": list(kind),
            "key": [None] + list(agent_ids) + list(mods),
            "value": shown,
            "semantics": ["mean_of_episode_sums"] * per_ep,
        },
        schema=schema.REPORTED_ITERATIONS,
    )
    return rep, dash


def generate_run(
    folder: str,
    *,
    iterations: int = 10,
    episodes_per_iteration: int = 200,
    agents: int = 8,
    modules: int = 4,
    runners: int = 8,
    max_chunks: int = 3,
    inject: str | None = None,
    inject_every: int = 7,
    seed: int = 0,
    batches: bool = False,
) -> SyntheticRun:
    """Write a synthetic run to ``folder/reward_audit``; about
    ``iterations × episodes_per_iteration × agents × (1 + max_chunks) / 2`` raw rows.
    ``batches``: also the training batches (``batch_rewards``, phase ``learning``), one row
    per raw row, right (what each agent's module was trained on)."""
    if inject not in (None, "leak", "drop"):
        raise ValueError(f"inject={inject!r}: use None, 'leak' or 'drop'")
    writer = RunWriter(f"{folder.rstrip('/')}/{schema.AUDIT_DIR_NAME}")
    module_ids = [f"p{m}" for m in range(modules)]
    writer.write_manifest(manifest(runners, module_ids, inject))
    raw_rows = rep_rows = injected = parts = episodes = 0
    for it, raw, rep, dash, hit in _iterations(iterations, episodes_per_iteration, agents, modules, runners, max_chunks, inject, inject_every, seed):
        tag = f"{it:06d}-train"
        tables = [("raw_rewards", raw), ("reported_episodes", rep), ("reported_iterations", dash)]
        if batches:
            tables.append(("batch_rewards", raw.select(schema.BATCH_REWARDS.names)))
        for table, data in tables:
            if data.num_rows:
                writer.write_table(table, data, tag if table != "reported_iterations" else f"{it:06d}")
                parts += 1
        raw_rows += raw.num_rows
        rep_rows += rep.num_rows
        episodes += rep.num_rows // (1 + agents + modules)
        injected += hit
    return SyntheticRun(writer.path, raw_rows, rep_rows, episodes, injected, parts)
