"""Build run folders from hand-written episodes (unit tests; no Ray).

Tests state the rewards the env paid per chunk and what RLlib reported, and compute the
expected truth themselves.
"""

from __future__ import annotations

from typing import Any

from reward_audit.schema import SCHEMA_VERSION, TOOL_NAME
from reward_audit.store import RunWriter

RUNNER = "train/0/aaaaaaaa"
EVAL_RUNNER = "evaluation/1/bbbbbbbb"


def manifest(**overrides: Any) -> dict:
    return {
        "tool": TOOL_NAME,
        "schema_version": SCHEMA_VERSION,
        "reward_audit_version": "0.1.0",
        "ray_version": "synthetic",
        "api_stack": "new",
        "adapter": "synthetic",
        **overrides,
    }


class SynthRun:
    def __init__(self) -> None:
        self.raw: list[dict] = []
        self.reported: list[dict] = []
        self.batches: list[dict] = []
        self._seq: dict[str, int] = {}

    def episode(
        self,
        episode_id: str,
        chunks: list[dict[Any, float]],
        mapping: dict[Any, str],
        *,
        runner: str = RUNNER,
        done: bool = True,
        pre_obs: dict[Any, float] | None = None,
    ) -> None:
        """``chunks[i][agent]`` = reward paid in chunk i; ``pre_obs[agent]`` is part of chunk 0's."""
        phase = runner.split("/")[0]
        for i, chunk in enumerate(chunks):
            seq = self._seq.get(runner, 0)
            self._seq[runner] = seq + 1
            for agent, reward in chunk.items():
                pre = (pre_obs or {}).get(agent, 0.0) if i == 0 else 0.0
                self.raw.append(
                    {
                        "phase": phase,
                        "runner_id": runner,
                        "worker_index": int(runner.split("/")[1]),
                        "env_index": 0,
                        "episode_id": episode_id,
                        "chunk_seq": seq,
                        "agent_id": str(agent),
                        "agent_id_type": type(agent).__name__,
                        "module_id": mapping.get(agent),
                        "reward": float(reward),
                        "n_rewards": 1,
                        "pre_obs_reward": float(pre),
                        "n_pre_obs": 1 if pre else 0,
                        "reward_cancel": 0.0,
                        "reward_bits": 53,
                        "episode_done": done and i == len(chunks) - 1,
                        "iteration": 1,
                    }
                )

    def report(self, episode_id: str, kind: str, value: float, *, agent: Any = None, module: str | None = None, runner: str = RUNNER) -> None:
        self.reported.append(
            {
                "phase": runner.split("/")[0],
                "runner_id": runner,
                "episode_id": episode_id,
                "kind": kind,
                "agent_id": None if agent is None else str(agent),
                "module_id": module,
                "value": float(value),
                "semantics": "episode_sum_counted",
                "metrics_call": 0,
                "iteration": 1,
            }
        )

    def trained(self, episode_id: str, chunk: int, agent: Any, module: str, reward: float, *, runner: str = RUNNER) -> None:
        """``reward`` of ``agent`` in the training batch of ``module`` (table batch_rewards,
        phase learning); ``chunk`` counts from 0 within the episode."""
        self.batches.append(
            {"phase": runner.split("/")[0], "runner_id": runner, "episode_id": episode_id, "chunk_seq": chunk, "agent_id": str(agent),
             "module_id": module, "reward": float(reward), "n_rewards": 1, "reward_bits": 53, "iteration": 1}
        )

    def write(self, folder: str, **manifest_overrides: Any) -> str:
        writer = RunWriter(folder)
        writer.write_manifest(manifest(**manifest_overrides))
        writer.write_rows("raw_rewards", self.raw, "000001")
        writer.write_rows("reported_episodes", self.reported, "000001")
        if self.batches:
            writer.write_rows("batch_rewards", self.batches, "000001")
        return folder
