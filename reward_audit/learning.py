"""The ``learning`` phase: were the modules trained on the right rewards?

``batch_rewards`` holds, per (episode, chunk, agent, module), the sum of the rewards each
train runner's ``sample()`` handed to training. Here they become per-episode values shaped
like ``reported_episodes`` rows (phase ``learning``, kind ``agent`` and ``module``, value =
the episode's batch rewards summed over all its chunks), and the ordinary reconciliation
(``tally`` + the verdicts of ``compare``) judges them against the *train* phase's raw
rewards, with the same rules as RLlib's metrics: rewards paid before or with an agent's
first observation are in no batch (EXCLUDED from the truth); a module whose batches carry
other agents' rewards is a LEAK, one missing its own agents' rewards a DROP.

How it joins (the least invasive way): ``tally`` joins raw and reported rows by (runner,
episode) and names a value's phase after the episode's raw rows. So ``learning_run`` builds
a small run folder of its own — the train phase's raw rows relabelled ``learning`` and the
converted batch rows as its reported values — and ``compare`` runs the same pass on it.
It holds a copy of the train raw rows (temporary, local disk): fine for the first slice;
streaming the relabel through ``read_window`` is the next step.

Only episodes whose raw rows say they are done are compared: a batch of a running
episode is partial.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .schema import MANIFEST_NAME, REPORTED_EPISODES, Kind, Phase, Semantics
from .store import Run, load_run, write_part

__all__ = ["learning_rows", "learning_run", "UNNAMED_PREFIX"]

UNNAMED_PREFIX = "#"  # old stack: an agent recorded by its `agent_index` only


def learning_rows(batch: pd.DataFrame, done: Iterable[tuple[str, str]]) -> pd.DataFrame:
    """``batch_rewards`` rows of the train phase -> ``reported_episodes`` rows of phase
    ``learning``: per done (runner, episode), one ``agent`` row per agent and one ``module``
    row per module, each the sum over the episode's chunks. An episode with an agent known
    only by its index (``#<agent_index>``, old stack) gets module rows only. E.g.::

        phase     runner_id        episode_id  kind    agent_id  module_id  value  metrics_call  iteration
        learning  train/0/ab12cd34  e1         agent   0         None       30.0   -1            2
        learning  train/0/ab12cd34  e1         module  None      p0         30.0   -1            2
    """
    columns = REPORTED_EPISODES.names
    batch = batch[batch["phase"] == Phase.TRAIN.value]
    done = pd.DataFrame(list(done), columns=["runner_id", "episode_id"]).drop_duplicates()
    batch = batch.merge(done, on=["runner_id", "episode_id"])
    if batch.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    episode = ["runner_id", "episode_id"]
    iteration = batch.groupby(episode)["iteration"].max().rename("iteration")
    unnamed = batch["agent_id"].str.startswith(UNNAMED_PREFIX).groupby([batch["runner_id"], batch["episode_id"]]).transform("any")
    agents = batch[~unnamed].groupby(episode + ["agent_id"], sort=False)["reward"].sum().reset_index()
    agents["kind"], agents["module_id"] = Kind.AGENT.value, None
    mapped = batch[batch["module_id"].notna()]
    modules = mapped.groupby(episode + ["module_id"], sort=False)["reward"].sum().reset_index()
    modules["kind"], modules["agent_id"] = Kind.MODULE.value, None
    out = pd.concat([agents, modules], ignore_index=True).rename(columns={"reward": "value"})
    out = out.merge(iteration.reset_index(), on=episode)
    out["phase"], out["semantics"], out["metrics_call"] = Phase.LEARNING.value, Semantics.EPISODE_SUM_COUNTED.value, -1
    return out[columns]


def learning_run(run: Run, folder: str) -> Run | None:
    """A run folder under ``folder`` (local) for the ``learning`` pass: the train raw rows
    relabelled ``learning`` and ``learning_rows`` as reported values; None if ``run``
    recorded no training batches (runs older than the ``batch_rewards`` table)."""
    if not run.rows("batch_rewards"):
        return None
    os.makedirs(os.path.join(folder, "raw_rewards"))
    os.makedirs(os.path.join(folder, "reported_episodes"))
    batch = run.read("batch_rewards").to_pandas()
    # The batch's precision bounds the comparison's rounding (old stack: float32 rewards).
    bits = batch.groupby(["runner_id", "episode_id"])["reward_bits"].min().dropna().astype("int64").rename("batch_bits")
    done: set[tuple[str, str]] = set()
    for i, part in enumerate(run.parts.get("raw_rewards", ())):  # one part at a time
        raw = run.read("raw_rewards", [part])
        raw = raw.filter(pc.equal(raw.column("phase"), Phase.TRAIN.value))
        if not raw.num_rows:
            continue
        raw = raw.set_column(raw.schema.get_field_index("phase"), "phase", pa.array([Phase.LEARNING.value] * raw.num_rows, pa.string()))
        if len(bits):
            frame = raw.select(["runner_id", "episode_id", "reward_bits"]).to_pandas()
            fewer = frame.join(bits, on=["runner_id", "episode_id"])[["reward_bits", "batch_bits"]].min(axis=1).fillna(53).astype("int32")
            raw = raw.set_column(raw.schema.get_field_index("reward_bits"), "reward_bits", pa.array(fewer.to_numpy(), pa.int32()))
        ended = raw.filter(raw.column("episode_done")).select(["runner_id", "episode_id"]).to_pylist()
        done.update((r["runner_id"], r["episode_id"]) for r in ended)
        with open(os.path.join(folder, "raw_rewards", f"part-{i:06d}-learning.parquet"), "wb") as f:
            write_part("raw_rewards", raw, f)
    rows = learning_rows(batch, done)
    with open(os.path.join(folder, "reported_episodes", "part-000000-learning.parquet"), "wb") as f:
        write_part("reported_episodes", pa.Table.from_pandas(rows, schema=REPORTED_EPISODES, preserve_index=False), f)
    with open(os.path.join(folder, MANIFEST_NAME), "w") as f:
        json.dump({**run.manifest, "reward_audit_view": "learning"}, f)
    return load_run(folder)
