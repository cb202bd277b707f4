"""The ``learning`` phase: were the modules trained on the right rewards?

``batch_rewards`` holds, per (episode, chunk, agent, module), the sum of the rewards each
train runner's ``sample()`` handed to training. ``LearningStream`` feeds them into the same
streamed pass as RLlib's metrics (``tally``), one iteration window at a time:

* the window's *train* raw rows are copied with phase ``learning`` — the truth;
* the batch rows of every train episode that finished in the window become per-episode
  values shaped like ``reported_episodes`` rows (phase ``learning``, kinds ``agent`` and
  ``module``, value = the sum over all the episode's chunks) — what was trained on;
* batch rows of episodes still running are carried to the next window (bounded by the
  running episodes, like tally's carried raw rows); at the end they are partial and dropped.

``read_window`` keeps the copies apart from the train rows by phase (window.py), so the
ordinary reconciliation and verdicts judge them with the metrics' rules: rewards paid
before or with an agent's first observation are in no batch (EXCLUDED from the truth); a
module whose batches carry other agents' rewards is a LEAK, one missing its own agents'
rewards a DROP. Only the copies cost anything: the raw parts are read once.

Where RLlib clipped the rewards before the batch (old stack ``clip_rewards``: the raw rows
hold Σ clip(r) in ``reward_clipped``), the copy's truth is Σ clip(r): training on clipped
rewards is what the setting asks for, and compare says so in a note.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import BATCH_REWARDS, REPORTED_EPISODES, Kind, Phase, Semantics
from .store import Run
from .window import KeyMap, codes, factorize, read_parts, unique_rows

__all__ = ["learning_rows", "finished", "LearningStream", "UNNAMED_PREFIX"]

UNNAMED_PREFIX = "#"  # old stack: an agent recorded by its `agent_index` only
_BATCH_KEY = ["runner_id", "episode_id", "chunk_seq", "agent_id", "module_id"]  # one batch row


def _dictionary(codes: np.ndarray, names: np.ndarray) -> pa.DictionaryArray:
    """Integer codes (-1: null) of ``names`` as a dictionary-encoded string column."""
    indices = pa.array(codes.astype(np.int32), mask=codes < 0)
    return pa.DictionaryArray.from_arrays(indices, pa.array(np.asarray(names, dtype=object), pa.string()))


def _constant(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], pa.string()))


def finished(batch: pa.Table, done: pa.Table) -> np.ndarray:
    """Which ``batch`` rows belong to an episode listed in ``done`` (runner_id, episode_id)."""
    (rb, rd), runners = codes(batch.column("runner_id"), done.column("runner_id"))
    (eb, ed), _ = codes(batch.column("episode_id"), done.column("episode_id"))
    nr = max(len(runners), 1)
    return KeyMap(ed * nr + rd, (int(max(eb.max(initial=0), ed.max(initial=0))) + 1) * nr).has(eb * nr + rb)


def learning_rows(batch: pa.Table) -> pa.Table:
    """``batch_rewards`` rows of finished train episodes (any order, each chunk once) ->
    ``reported_episodes`` rows of phase ``learning`` (strings dictionary-encoded): per
    episode, one ``agent`` row per agent and one ``module`` row per module, each the sum
    over the episode's chunks, at the iteration of its last batch. An episode with an agent
    known only by its index (``#<agent_index>``, old stack) gets module rows only. E.g.::

        phase     runner_id        episode_id  kind    agent_id  module_id  value  metrics_call  iteration
        learning  train/0/ab12cd34  e1         agent   0         None       30.0   -1            2
        learning  train/0/ab12cd34  e1         module  None      p0         30.0   -1            2

    Integer-coded group-bys (window.codes / factorize), as in tally: no per-row strings."""
    (r,), runners = codes(batch.column("runner_id"))
    (e,), episodes = codes(batch.column("episode_id"))
    (a,), agents = codes(batch.column("agent_id"))
    (m,), modules = codes(batch.column("module_id"))
    reward = batch.column("reward").to_numpy().astype(np.float64, copy=False)
    iteration = batch.column("iteration").to_numpy().astype(np.int64, copy=False)
    nr, na, nm = max(len(runners), 1), max(len(agents), 1), max(len(modules), 1)
    episode = e * nr + r
    space = (int(e.max(initial=0)) + 1) * nr
    named = np.ones(len(batch), bool)
    unnamed = np.array([str(x).startswith(UNNAMED_PREFIX) for x in agents], bool)
    if unnamed.any():  # every row of an episode with an unnamed agent
        named = ~KeyMap(episode[unnamed[a]], space).has(episode)
    parts = []
    for kind, rows, code, n_codes in ((Kind.AGENT.value, named, a, na), (Kind.MODULE.value, m >= 0, m, nm)):
        group, keys = factorize(episode[rows] * n_codes + code[rows], space * n_codes)
        total = np.bincount(group, weights=reward[rows], minlength=len(keys))
        last = np.full(len(keys), np.iinfo(np.int64).min, np.int64)
        np.maximum.at(last, group, iteration[rows])
        ep, key = keys // n_codes, keys % n_codes
        n = len(keys)
        ids = _dictionary(key, agents if kind == Kind.AGENT.value else modules)
        none = _dictionary(np.full(n, -1), np.zeros(0, dtype=object))
        parts.append(
            pa.table(
                {
                    "phase": _constant(Phase.LEARNING.value, n),
                    "runner_id": _dictionary(ep % nr, runners),
                    "episode_id": _dictionary(ep // nr, episodes),
                    "kind": _constant(kind, n),
                    "agent_id": ids if kind == Kind.AGENT.value else none,
                    "module_id": ids if kind == Kind.MODULE.value else none,
                    "value": pa.array(total, pa.float64()),
                    "semantics": _constant(Semantics.EPISODE_SUM_COUNTED.value, n),
                    "metrics_call": pa.array(np.full(n, -1), REPORTED_EPISODES.field("metrics_call").type),
                    "iteration": pa.array(last, REPORTED_EPISODES.field("iteration").type),
                }
            )
        )
    return pa.concat_tables(parts)


class LearningStream:
    """The ``learning`` phase's rows for each window of ``tally`` (``window.read_window``)."""

    ORD_BASE = 1 << 62  # after every reported part's (index << 32) + row

    def __init__(self, run: Run):
        self.run = run
        self.parts = list(run.parts.get("batch_rewards", ()))
        self.carried: pa.Table | None = None  # batch rows of episodes not done yet
        self.bits: dict[str, int] = {}  # runner -> fewest significand bits of its batches
        self.emitted = 0  # learning values made so far (their `ord`)
        self.clipped = 0  # copied raw rows whose truth is Σ clip(r)

    def __bool__(self) -> bool:
        return bool(self.parts)

    def batch(self, a: int, b: int) -> tuple[pa.Table | None, int, list]:
        """The window's train batch rows, identical copies counted once; also the rows read
        and the duplicates note ``(table, rows dropped, files)`` (none: empty list).
        Contradictory copies: an error naming them."""
        parts = [p for p in self.parts if p.last_iteration >= a and p.first_iteration <= b]
        table, file_of, files = read_parts(self.run, "batch_rewards", parts, BATCH_REWARDS.names, a, b, None)
        if table is None or not table.num_rows:
            return None, 0, []
        read_rows = table.num_rows
        train = pc.equal(table.column("phase").cast(pa.string()), Phase.TRAIN.value)
        table, file_of = table.filter(train), file_of[train.to_numpy(zero_copy_only=False)]
        (runner,), runners = codes(table.column("runner_id"))
        key = [runner] + [codes(table.column(c))[0][0] for c in ("episode_id", "agent_id", "module_id")]
        keep, note = unique_rows("batch_rewards", key + [table.column("chunk_seq").to_numpy()], table, file_of, files, ["reward", "n_rewards", "reward_bits", "iteration"])
        if keep is not None:
            table, runner = table.filter(pa.array(keep)), runner[keep]
        fewest = np.full(len(runners), 53, np.int64)
        np.minimum.at(fewest, runner, pc.fill_null(table.column("reward_bits"), 53).to_numpy().astype(np.int64))
        for name, bits in zip(runners, fewest.tolist()):
            self.bits[name] = min(bits, self.bits.get(name, 53))
        return table, read_rows, [note] if note else []

    def copies(self, train: pa.Table) -> pa.Table:
        """Freshly read train raw rows (typed as ``read_window`` reads them) as phase
        ``learning``: their rounding bound takes the fewer significand bits of the env's
        rewards and the runner's batches; where RLlib clipped before the batch, the reward
        is Σ clip(r)."""
        n = train.num_rows
        train = train.set_column(train.schema.get_field_index("phase"), "phase", _constant(Phase.LEARNING.value, n))
        if self.bits and min(self.bits.values()) < 53:
            runner = train.column("runner_id").unify_dictionaries().combine_chunks()
            fewer = np.array([self.bits.get(r, 53) for r in runner.dictionary.to_pylist()] or [53], np.int32)
            fewer = fewer[pc.fill_null(runner.indices, 0).to_numpy(zero_copy_only=False)]
            bits = np.minimum(pc.fill_null(train.column("reward_bits"), 53).to_numpy().astype(np.int32), fewer)
            train = train.set_column(train.schema.get_field_index("reward_bits"), "reward_bits", pa.array(bits, train.schema.field("reward_bits").type))
        clipped = pc.fill_null(train.column("reward_clipped"), np.nan).to_numpy().astype(np.float64)
        has = ~np.isnan(clipped)
        if has.any():
            self.clipped += int(has.sum())
            reward = train.column("reward").to_numpy().astype(np.float64)
            pre = train.column("pre_obs_reward").to_numpy().astype(np.float64)
            cancel = pc.fill_null(train.column("reward_cancel").cast(pa.float64()), np.nan).to_numpy()
            n_rewards = train.column("n_rewards").to_numpy().astype(np.float64)
            new = np.where(has, clipped + pre, reward)
            # Σ|clip(r)| <= max(Σ|r|, n) (sign clipping lifts |r| < 1 to 1): keep |reward| + cancel a bound.
            bound = np.where(has, np.maximum(np.abs(reward) + cancel, n_rewards) + np.abs(pre), np.abs(reward) + cancel)
            cancel = np.maximum(bound - np.abs(new), 0.0) * (1 + 2**-20)
            for name, values in (("reward", new), ("reward_cancel", cancel)):
                i = train.schema.get_field_index(name)
                train = train.set_column(i, name, pa.array(values, train.schema.field(i).type, from_pandas=True))
        return train

    def values(self, batch: pa.Table | None, done: pa.Table | None, last: bool) -> pa.Table | None:
        """The learning values (``learning_rows`` with an ``ord``) of the episodes listed in
        ``done`` (runner_id, episode_id) from ``batch`` and the carried rows; the rest is
        carried, or dropped after the last window (still running, so partial)."""
        tables = [t for t in (self.carried, batch) if t is not None and t.num_rows]
        if not tables:
            self.carried = None
            return None
        batch = pa.concat_tables(tables).unify_dictionaries() if len(tables) > 1 else tables[0]
        is_done = finished(batch, done) if done is not None and done.num_rows else np.zeros(batch.num_rows, bool)
        self.carried = None if last else _compact(batch.filter(pa.array(~is_done)))
        if not is_done.any():
            return None
        rows = learning_rows(batch.filter(pa.array(is_done)))
        rows = rows.append_column("ord", pa.array(self.ORD_BASE + self.emitted + np.arange(rows.num_rows, dtype=np.int64)))
        self.emitted += rows.num_rows
        return rows


def _compact(table: pa.Table) -> pa.Table:
    """Re-encode the string columns of a filtered table: a filter keeps each chunk's whole
    dictionary, so carried rows would drag every episode id ever read from window to window."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, pc.dictionary_encode(table.column(i).cast(pa.string())))
    return table
