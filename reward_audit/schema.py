"""The run-folder format: every table's Arrow schema, the schema version, and the meaning
of every recorded number. The single source of truth; ``docs/schema.md`` is generated
from this module (``python -m reward_audit.schema > docs/schema.md``) and checked in CI.

A run folder looks like this::

    reward_audit/
      run.json                          manifest (see MANIFEST_FIELDS)
      raw_rewards/part-000001-3f2a9c1e.parquet
      reported_episodes/part-000001-3f2a9c1e.parquet
      reported_iterations/part-000001-3f2a9c1e.parquet
      drains/part-000001-3f2a9c1e.parquet
      batch_rewards/part-000001-3f2a9c1e.parquet

Each part file is written under a temporary name and renamed, so it is complete or absent.
"""

from __future__ import annotations

import enum

import pyarrow as pa

SCHEMA_VERSION = 4
# Versions this reward_audit reads. Version 1 parts lack `reward_cancel` / `reward_bits`: their
# values are compared with the old relative tolerance, and the audit says so. Version 3 adds
# the `drains` table and the manifest's `segments` (restores); without them the audit cannot
# see lost hand-overs and says so. Version 4 adds the `batch_rewards` table (phase
# `learning`) and `drains.batch_rows`, which lets the audit see lost batch rows.
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)
TOOL_NAME = "reward_audit"
MANIFEST_NAME = "run.json"
AUDIT_DIR_NAME = "reward_audit"


class Phase(str, enum.Enum):
    TRAIN = "train"
    EVALUATION = "evaluation"
    # Not recorded by a runner: the audit's view of what train runners handed to training
    # (``batch_rewards``) against the train phase's raw rewards (learning.py).
    LEARNING = "learning"


class Kind(str, enum.Enum):
    """What one reported number is about."""

    AGENT = "agent"  # one agent's return (key: agent id)
    MODULE = "module"  # one RLModule's return (key: module id), new API stack
    POLICY = "policy"  # one (agent, policy) entry, old API stack / Ray 2.12 RolloutMetrics
    EPISODE = "episode"  # the whole multi-agent episode return


class Semantics(str, enum.Enum):
    """What a captured per-episode number claims to be. Each adapter declares it per row;
    the comparator builds the truth to match and refuses (UNVERIFIED) what it does not know.
    """

    # Sum, over the whole episode, of the rewards RLlib counts for the selected agents:
    # kind=agent -> that agent; kind=module -> every agent mapped to the module in that
    # episode; kind=policy -> the row's agent; kind=episode -> every agent.
    EPISODE_SUM_COUNTED = "episode_sum_counted"


# What one iteration-level (dashboard) number is.
class IterationSemantics(str, enum.Enum):
    MEAN_OF_EPISODE_SUMS = "mean_of_episode_sums"  # mean over episodes of a per-episode sum
    MEAN_OF_AGENT_EPISODES = "mean_of_agent_episodes"  # mean over (agent, episode) entries
    MIN_OF_AGENT_EPISODES = "min_of_agent_episodes"  # min over (agent, episode) entries
    MAX_OF_AGENT_EPISODES = "max_of_agent_episodes"  # max over (agent, episode) entries
    MIN_OF_EPISODE_SUMS = "min_of_episode_sums"
    MAX_OF_EPISODE_SUMS = "max_of_episode_sums"


RAW_REWARDS = pa.schema(
    [
        pa.field("phase", pa.string(), nullable=False),
        pa.field("runner_id", pa.string(), nullable=False),
        pa.field("worker_index", pa.int32(), nullable=False),
        pa.field("env_index", pa.int32(), nullable=False),
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("chunk_seq", pa.int64(), nullable=False),
        pa.field("agent_id", pa.string(), nullable=False),
        pa.field("agent_id_type", pa.string(), nullable=False),
        pa.field("module_id", pa.string()),
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("n_rewards", pa.int32(), nullable=False),
        pa.field("pre_obs_reward", pa.float64(), nullable=False),
        pa.field("n_pre_obs", pa.int32(), nullable=False),
        pa.field("episode_done", pa.bool_(), nullable=False),
        pa.field("iteration", pa.int64(), nullable=False),
        pa.field("reward_cancel", pa.float32()),
        pa.field("reward_bits", pa.int32()),
        pa.field("reward_clipped", pa.float64()),
    ]
)
V2_RAW_COLUMNS = ("reward_cancel", "reward_bits", "reward_clipped")  # absent from schema-1 parts

RAW_REWARDS_DOC = {
    "phase": "`train` or `evaluation` (the env runner's `config.in_evaluation`).",
    "runner_id": "`<phase>/<worker_index>/<uuid8>`: one env-runner incarnation (a restarted actor gets a new uuid).",
    "worker_index": "RLlib's worker index (0 = local runner; evaluation runners also count from 1).",
    "env_index": "Index of the sub-environment inside the runner's vector env.",
    "episode_id": "RLlib's episode id (new stack `episode.id_`; old stack: runner uuid + `episode_id`, which repeats under seeding).",
    "chunk_seq": "The runner's `sample()` call number in which these steps were taken; one chunk = one episode's steps within one `sample()` call.",
    "agent_id": "Agent id as a canonical string (`str(agent_id)`).",
    "agent_id_type": "Python type name of the original agent id (`int`, `str`, ...).",
    "module_id": "Module / policy the agent was mapped to in this episode (null if RLlib never mapped it).",
    "reward": "Sum of every reward the env's `step()` returned to this agent in this chunk (the truth), compensated (Neumaier), so it is the exact sum rounded once.",
    "n_rewards": "Number of reward entries summed in `reward`.",
    "pre_obs_reward": "Part of `reward` paid before or with the agent's first observation of the episode; RLlib never counts it (by design).",
    "n_pre_obs": "Number of reward entries summed in `pre_obs_reward`.",
    "episode_done": "True if the episode terminated or truncated within this chunk.",
    "iteration": "The audit's count of `train()` results when the driver collected the row (train rows: the result that sampled them). It equals RLlib's `training_iteration` unless the run was restored; the manifest's `segments` map one to the other.",
    "reward_cancel": "Σ|r| − |reward| over the same rewards, rounded up to float32 (0 unless the rewards change sign): |reward| + this bounds Σ|r|, which with `n_rewards` and `reward_bits` bounds the rounding of any float sum of them (schema 2; null in schema 1).",
    "reward_clipped": "Only when RLlib clips rewards before counting them (old stack `clip_rewards`, Atari): the sum of the clipped counted rewards, Σ clip(r) — what RLlib's returns are then made of. Null otherwise (schema 2).",
    "reward_bits": "Fewest significand bits among the rewards' types (53 float64 / Python float or int, 24 float32, 11 float16): RLlib sums in that precision (schema 2).",
}

REPORTED_EPISODES = pa.schema(
    [
        pa.field("phase", pa.string(), nullable=False),
        pa.field("runner_id", pa.string(), nullable=False),
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("agent_id", pa.string()),
        pa.field("module_id", pa.string()),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("semantics", pa.string(), nullable=False),
        pa.field("metrics_call", pa.int64(), nullable=False),
        pa.field("iteration", pa.int64(), nullable=False),
    ]
)

REPORTED_EPISODES_DOC = {
    "phase": "`train` or `evaluation`.",
    "runner_id": "The runner that reported the episode (same as in raw_rewards).",
    "episode_id": "Episode id, joinable with raw_rewards.",
    "kind": "`agent`, `module`, `policy` (an (agent, policy) entry) or `episode` (the whole return).",
    "agent_id": "Set for `agent` and `policy` rows (canonical string).",
    "module_id": "Set for `module` and `policy` rows.",
    "value": "The return RLlib itself computed for this finished episode.",
    "semantics": "What the value claims to be (`Semantics`), declared by the capture adapter.",
    "metrics_call": "The runner's `get_metrics()` call number that reported it (-1 where metrics are not per call, old stack).",
    "iteration": "The audit's count of `train()` results when the driver collected the row (as in raw_rewards).",
}

REPORTED_ITERATIONS = pa.schema(
    [
        pa.field("phase", pa.string(), nullable=False),
        pa.field("iteration", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("semantics", pa.string(), nullable=False),
    ]
)

REPORTED_ITERATIONS_DOC = {
    "phase": "`train` or `evaluation` (`evaluation/...` keys of the result).",
    "iteration": "The audit's count of `train()` results: the result's `training_iteration` unless the run was restored (manifest `segments`).",
    "path": "Full `/`-joined key path in the `train()` result, as Tune flattens it for TensorBoard (`ray/tune/` + path).",
    "kind": "`agent`, `module`, `policy` or `episode`.",
    "key": "Agent / module / policy id (null for `episode`).",
    "value": "The number shown on the dashboard (NaN if RLlib reported NaN).",
    "semantics": "What the number is (`IterationSemantics`).",
}

DRAINS = pa.schema(
    [
        pa.field("phase", pa.string(), nullable=False),
        pa.field("runner_id", pa.string(), nullable=False),
        pa.field("worker_index", pa.int32(), nullable=False),
        pa.field("pid", pa.int64(), nullable=False),
        pa.field("iteration", pa.int64(), nullable=False),
        pa.field("drain_seq", pa.int64(), nullable=False),
        pa.field("raw_rows", pa.int64(), nullable=False),
        pa.field("reported_rows", pa.int64(), nullable=False),
        pa.field("raw_total", pa.int64(), nullable=False),
        pa.field("reported_total", pa.int64(), nullable=False),
        pa.field("dropped_raw", pa.int64(), nullable=False),
        pa.field("dropped_reported", pa.int64(), nullable=False),
        pa.field("dropped_episode_ids", pa.list_(pa.string())),
        pa.field("failures", pa.int64(), nullable=False),
        pa.field("batch_rows", pa.int64()),
    ]
)

DRAINS_DOC = {
    "phase": "`train` or `evaluation`.",
    "runner_id": "The runner incarnation that handed the rows over.",
    "worker_index": "RLlib's worker index of that runner.",
    "pid": "Process id of the runner.",
    "iteration": "Iteration (see `raw_rewards.iteration`) the rows were collected in.",
    "drain_seq": "The runner's hand-over number, from 0: a gap means a hand-over was lost.",
    "raw_rows": "Raw rows in this hand-over.",
    "reported_rows": "Reported rows in this hand-over.",
    "raw_total": "Raw rows the runner produced since it started (dropped ones included).",
    "reported_total": "Episodes the runner recorded RLlib values for since it started (dropped ones included).",
    "dropped_raw": "Raw rows the runner dropped since it started (its buffer was full, `$REWARD_AUDIT_MAX_BUFFERED_ROWS`).",
    "dropped_reported": "Reported episodes it dropped since it started.",
    "dropped_episode_ids": "Episodes dropped whole since the previous hand-over; the audit leaves all their rows out.",
    "failures": "Failures logged inside reward_audit on that runner since it started.",
    "batch_rows": "`batch_rewards` rows in this hand-over (schema 4; null before): fewer stored than handed over means training-batch rows were lost.",
}

BATCH_REWARDS = pa.schema(
    [
        pa.field("phase", pa.string(), nullable=False),
        pa.field("runner_id", pa.string(), nullable=False),
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("chunk_seq", pa.int64(), nullable=False),
        pa.field("agent_id", pa.string(), nullable=False),
        pa.field("module_id", pa.string()),
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("n_rewards", pa.int32(), nullable=False),
        pa.field("reward_bits", pa.int32()),
        pa.field("iteration", pa.int64(), nullable=False),
    ]
)

BATCH_REWARDS_DOC = {
    "phase": "`train` or `evaluation` (the runner's phase; only `train` batches are audited, phase `learning`).",
    "runner_id": "The runner that sampled the batch (same as in raw_rewards).",
    "episode_id": "Episode id, joinable with raw_rewards (old stack: runner uuid + the batch's `eps_id`).",
    "chunk_seq": "The runner's `sample()` call number that returned the batch (as in raw_rewards).",
    "agent_id": "Agent id as a canonical string. Old stack: the agent's id when the runner still knew the episode's `agent_index` map, else `#<agent_index>`.",
    "module_id": "Module (new stack) / policy (old stack) whose training data holds these rewards.",
    "reward": "Sum of the agent's rewards in the data `sample()` returned for training (new stack: the episode chunk's `get_rewards()`; old stack: the policy batch's `rewards` column).",
    "n_rewards": "Number of rewards summed in `reward`.",
    "reward_bits": "Significand bits of the batch's reward array (24: float32, as the old stack's `SampleBatch` stores them); the learning comparison's rounding bound uses the fewer of these and the env's.",
    "iteration": "The audit's count of `train()` results when the driver collected the row (as in raw_rewards).",
}

# Columns a table gained after schema 1: parts of an older version lack them (read as null).
ADDED_COLUMNS: dict[str, dict[int, tuple[str, ...]]] = {"raw_rewards": {2: V2_RAW_COLUMNS}, "drains": {4: ("batch_rows",)}}


def optional_columns(table: str, version: int) -> tuple[str, ...]:
    """The columns of ``table`` a part of schema ``version`` may lack."""
    return tuple(c for since, columns in ADDED_COLUMNS.get(table, {}).items() if version < since for c in columns)


TABLES: dict[str, pa.Schema] = {
    "raw_rewards": RAW_REWARDS,
    "reported_episodes": REPORTED_EPISODES,
    "reported_iterations": REPORTED_ITERATIONS,
    "drains": DRAINS,
    "batch_rewards": BATCH_REWARDS,
}

TABLE_DOCS: dict[str, tuple[str, dict[str, str]]] = {
    "raw_rewards": (
        "One row per (runner, env index, episode, chunk, agent): what the env's `step()` paid.",
        RAW_REWARDS_DOC,
    ),
    "reported_episodes": (
        "One row per (episode, kind, key): the per-episode return RLlib computed.",
        REPORTED_EPISODES_DOC,
    ),
    "reported_iterations": (
        "One row per (iteration, phase, metric path): what the `train()` result (Tune, TensorBoard) showed.",
        REPORTED_ITERATIONS_DOC,
    ),
    "drains": (
        "One row per hand-over of an env runner's rows to the driver (schema 3): how the audit knows nothing was lost.",
        DRAINS_DOC,
    ),
    "batch_rewards": (
        "One row per (runner, episode, chunk, agent, module): the rewards `sample()` handed to training (schema 4; the `learning` phase, docs/learning.md).",
        BATCH_REWARDS_DOC,
    ),
}

MANIFEST_FIELDS = {
    "tool": "Always `reward_audit` (tells our folders from other tools').",
    "schema_version": "Format version of the tables; readers refuse other versions.",
    "reward_audit_version": "Version of reward_audit that wrote the run.",
    "ray_version": "`ray.__version__` of the driver.",
    "api_stack": "`new` (RLModule + EnvRunner) or `old` (RolloutWorker).",
    "adapter": "Capture adapter that recorded the run (see docs/ray_versions.md).",
    "algorithm": "Algorithm class name.",
    "env": "Env name or class.",
    "policies": "Module / policy ids.",
    "policies_to_train": "Trainable module ids, if restricted.",
    "policy_mapping_fn": "Qualified name of the mapping function.",
    "rollout_fragment_length": "Config value (`auto` or an int).",
    "metrics_num_episodes_for_smoothing": "Smoothing window S.",
    "num_env_runners": "Remote env runners for training.",
    "num_envs_per_env_runner": "Sub-environments per runner.",
    "evaluation_interval": "Config value (null: no evaluation).",
    "iteration_semantics": "Per metric path pattern: what the dashboard number means.",
    "iteration_paths": "`[pattern, kind, semantics]` per recorded dashboard path (a pattern ending in `/` takes the key after it).",
    "smoothing_model": "Which episodes one iteration's value covers: `per_call_window` (new stack 2.4x+) or `driver_history` (2.1x, old stack).",
    "async_metrics": "APPO / IMPALA (asynchronous sampling): an iteration's dashboard shows get_metrics() calls by arrival time; the rebuild finds each iteration's calls.",
    "evaluation_discards_last_call": "New stack < 2.60 with remote evaluation runners: RLlib drops each runner's last evaluation call from the dashboard.",
    "created_at": "UTC time the run started.",
    "output": "Where the audit folder was written.",
    "output_source": "Why there: `$REWARD_AUDIT_DIR`, `RewardAuditCallback.writing_to()`, `trial dir` or `algorithm.logdir`.",
    "injected_fault": "Self-test fault deliberately injected into RLlib's metrics (`leak`, `drop`, `mismatch`) or into the training data (`signal`), else null.",
    "capture_failures": "Failures logged inside reward_audit on the env runners while recording, summed over every runner incarnation and every segment (absent when none).",
    "driver_failures": "Failures logged inside reward_audit on the driver (a hook that raised, a write that failed; absent when none).",
    "segments": "One entry per stretch of training recorded without a restore: `first_iteration` / `last_iteration` (audit count), `first_training_iteration` / `last_training_iteration` (RLlib's), `started_at`, `pid`, `reason` (`start`, `restored` in the same process, `reopened` by a new process).",
}


def schema_markdown() -> str:
    """Render this module as the Markdown page ``docs/schema.md``."""
    lines = [
        "# Run-folder schema",
        "",
        "<!-- generated by `python -m reward_audit.schema`; do not edit by hand -->",
        "",
        f"Schema version: **{SCHEMA_VERSION}**. A run folder is `{AUDIT_DIR_NAME}/` with "
        f"`{MANIFEST_NAME}` and one sub-folder of Parquet part files per table. "
        "Part files are written under a temporary name and renamed (complete or absent); "
        "each carries the schema version in its Arrow metadata.",
        "",
        f"## `{MANIFEST_NAME}`",
        "",
        "| field | meaning |",
        "| --- | --- |",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in MANIFEST_FIELDS.items()]
    for name, schema in TABLES.items():
        summary, docs = TABLE_DOCS[name]
        lines += ["", f"## `{name}/`", "", summary, "", "| column | type | meaning |", "| --- | --- | --- |"]
        for field in schema:
            null = "" if field.nullable else ", not null"
            lines.append(f"| `{field.name}` | {field.type}{null} | {docs[field.name]} |")
    lines += ["", "## Semantics of reported per-episode values", "", "| value | meaning |", "| --- | --- |"]
    lines.append(
        f"| `{Semantics.EPISODE_SUM_COUNTED.value}` | Sum over the whole episode of the rewards RLlib "
        "counts (all rewards minus `pre_obs_reward`) for the row's agent (`agent`, `policy`), for every "
        "agent mapped to the module in that episode (`module`), or for all agents (`episode`). |"
    )
    lines += ["", "## Semantics of dashboard values", "", "| value | meaning |", "| --- | --- |"]
    meaning = {
        IterationSemantics.MEAN_OF_EPISODE_SUMS: "Mean, over the episodes in RLlib's window, of a per-episode sum (for a module: over its agents).",
        IterationSemantics.MEAN_OF_AGENT_EPISODES: "Mean over (agent, episode) entries: a policy shared by k agents shows the per-agent mean.",
        IterationSemantics.MIN_OF_EPISODE_SUMS: "Minimum over the window's episodes.",
        IterationSemantics.MAX_OF_EPISODE_SUMS: "Maximum over the window's episodes.",
        IterationSemantics.MIN_OF_AGENT_EPISODES: "Minimum over (agent, episode) entries (old-stack / Ray 2.1x `policy_reward_min`).",
        IterationSemantics.MAX_OF_AGENT_EPISODES: "Maximum over (agent, episode) entries (old-stack / Ray 2.1x `policy_reward_max`).",
    }
    lines += [f"| `{k.value}` | {v} |" for k, v in meaning.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(schema_markdown(), end="")
