"""The ``learning`` phase: were the modules trained on the right rewards?

``batch_rewards`` holds, per (episode, chunk, agent, module), the sum of the rewards each
train runner's ``sample()`` handed to training. They join the same streamed pass as RLlib's
metrics (``tally``): ``read_window`` encodes the window's batch rows in the codes of its raw
rows (``b_*`` arrays, each row on its train episode), ``tally._close`` carries the batch rows
of running episodes to the next window with their raw rows, and ``learning_values`` turns the batch
rows of every finished train episode into values of phase ``learning`` beside RLlib's
reported ones:

* per (episode, agent): the sum over all the episode's chunks, against the agent's truth;
* per (episode, module): the sum over its agents' rows, against the truth of the agents the
  raw rows map to the module.

So the verdicts, evidence and explanations are the metrics' own, with the same truth:
rewards paid before or with an agent's first observation are in no batch (EXCLUDED, shown
once in the ``train`` phase); a module whose batches carry other agents' rewards is a LEAK,
one missing its own agents' rewards a DROP. The raw rows are read once; the batch rows cost
one more table in the window and one value per (episode, agent) and (episode, module).

Only finished episodes are compared: a batch of a running episode is partial. Where RLlib
clipped the rewards before the batch (old stack ``clip_rewards``: the raw rows hold
Σ clip(r) in ``reward_clipped``), the truth is Σ clip(r): training on clipped rewards is
what the setting asks for, and ``compare`` says so in a note.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .recorder import rounding_bound
from .schema import BATCH_REWARDS, Phase
from .store import Run
from .window import AGENT, MODULE, LeftOut, Window, codes, factorize, read_parts, unique_rows

__all__ = ["LearningStream", "Values", "learning_values", "UNNAMED_PREFIX", "ORD_BASE"]

UNNAMED_PREFIX = "#"  # old stack: an agent recorded by its `agent_index` only
ORD_BASE = 1 << 62  # learning values sort after every reported part's (index << 32) + row
BATCH_VALUES = ["reward", "n_rewards", "reward_bits", "iteration"]


class LearningStream:
    """The run's ``batch_rewards`` parts, read one window at a time."""

    def __init__(self, run: Run, skip: set[str] | frozenset = frozenset()):
        self.run = run
        self.parts = list(run.parts.get("batch_rewards", ()))
        self.skip = set(skip)  # runners whose batch rows were lost (handover): not judged
        self.emitted = 0  # learning values made so far (their `ord`)
        self.runner_rows: dict[str, int] = {}  # runner id -> batch rows read (after de-duplication)

    def __bool__(self) -> bool:
        return bool(self.parts)

    def batch(self, a: int, b: int, left_out: LeftOut | None) -> tuple[pa.Table | None, int, list]:
        """The train batch rows of iterations ``a``–``b``, identical copies counted once,
        left-out runners and episodes removed; also the rows read and the duplicates note
        ``(table, rows dropped, files)`` (none: empty list). Contradictory copies: an error
        naming both files."""
        parts = [p for p in self.parts if p.last_iteration >= a and p.first_iteration <= b]
        table, file_of, files = read_parts(self.run, "batch_rewards", parts, BATCH_REWARDS.names, a, b, None)
        if table is None or not table.num_rows:
            return None, 0, []
        read_rows = table.num_rows
        train = pc.equal(table.column("phase").cast(pa.string()), Phase.TRAIN.value)
        table, file_of = table.filter(train), file_of[train.to_numpy(zero_copy_only=False)]
        (runner,), runners = codes(table.column("runner_id"))
        key = [runner] + [codes(table.column(c))[0][0] for c in ("episode_id", "agent_id", "module_id")] + [table.column("chunk_seq").to_numpy()]
        keep, note = unique_rows("batch_rewards", key, table, file_of, files, BATCH_VALUES)
        if keep is not None:
            table, file_of, runner = table.filter(pa.array(keep)), file_of[keep], runner[keep]
        for name, n in zip(runners, np.bincount(runner, minlength=len(runners)).tolist()):
            self.runner_rows[name] = self.runner_rows.get(name, 0) + n
        out = LeftOut(self.skip | (left_out.runners if left_out else set()), left_out.episodes if left_out else set())
        if out:
            table, _ = out.apply(table, file_of)
        return table, read_rows, [note] if note else []


@dataclass
class Values:
    """The learning values of one window, as ``values.match`` appends them to its ``c_*``
    arrays (agent values have module -1, module values agent -1; missing: expected from
    the raw rows but in no batch, value 0)."""

    kind: np.ndarray
    eid: np.ndarray
    agent: np.ndarray
    module: np.ndarray
    truth: np.ndarray
    value: np.ndarray
    bound: np.ndarray
    missing: np.ndarray
    iteration: np.ndarray
    ord: np.ndarray
    unbatched: np.ndarray  # finished train episodes with raw rows and no batch at all
    orphans: np.ndarray  # episodes with batch rows and no raw rows
    clipped: int  # (episode, agent) truths that are Σ clip(r)


def learning_values(w: Window, stream: LearningStream, train_code: int) -> Values | None:
    """The learning values of the window's finished train episodes (``w.closed``,
    ``w.ep_done``) from their batch rows, with the truth of their raw rows (``tally._truth``:
    ``g_*`` per (episode, agent)). None when the window holds no batch rows."""
    if not len(w.b_eid):
        return None
    E, na, nm = w.E, max(len(w.agents), 1), len(w.modules) + 1
    judged = w.closed & w.has_raw & w.ep_done & (w.ep_phase == train_code)
    if stream.skip:  # their batch rows were lost (handover.missing_batch_rows)
        judged &= ~np.array([r in stream.skip for r in w.runners], bool)[w.ep_runner]
    rows = judged[w.b_eid]
    has_batch = np.bincount(w.b_eid[rows], minlength=E) > 0
    eid, agent, module = w.b_eid[rows], w.b_agent[rows], w.b_module[rows]
    reward, iteration, bits = w.b_reward[rows], w.b_iteration[rows], w.b_bits[rows]
    # Episodes with an agent known only by its index (old stack): module values only.
    unnamed = np.array([str(x).startswith(UNNAMED_PREFIX) for x in w.agents], bool)
    blind = np.zeros(E, bool)
    if unnamed.any() and len(agent):
        blind[eid[(agent >= 0) & unnamed[np.maximum(agent, 0)]]] = True
    # The truth per (episode, agent): Σ clip(r) where RLlib clipped before the batch.
    clipped = np.isfinite(w.g_clipped)
    g_truth = np.where(clipped, w.g_clipped, w.g_counted)
    g_abs = np.where(clipped, np.maximum(w.g_abs, w.g_n), w.g_abs)  # Σ|clip(r)| <= max(Σ|r|, n)
    # The batch's precision bounds the rounding too (old stack: float32 rewards).
    g_bits = w.g_bits
    if (bits != 53).any():
        e_bits = np.full(E, 53, np.int64)
        np.minimum.at(e_bits, eid, bits)
        g_bits = np.minimum(w.g_bits, e_bits[w.g_eid])
    g_bound = rounding_bound(w.g_n, g_abs, g_bits, w.ep_chunks[w.g_eid], np.ones(len(w.g_eid)), unknown=w.g_unknown)
    out = []
    # Per agent (of episodes whose agents are all named) and per module: every key of a
    # judged episode with batches that its batch rows or its raw rows name.
    for kind in (AGENT, MODULE):
        if kind == AGENT:
            sel = (agent >= 0) & ~blind[eid]
            space, b_key = E * na, eid[sel] * na + agent[sel]
            g_ok = has_batch[w.g_eid] & judged[w.g_eid] & ~blind[w.g_eid]
            t_key = w.g_eid[g_ok] * na + w.g_agent[g_ok]
        else:
            sel = module >= 0
            space, b_key = E * nm, eid[sel] * nm + module[sel]
            g_ok = has_batch[w.g_eid] & judged[w.g_eid] & (w.g_module >= 0)
            t_key = w.g_eid[g_ok] * nm + w.g_module[g_ok]
        keys = np.concatenate([b_key, t_key])
        group, uniq = factorize(keys, space)
        n = len(uniq)
        nb = len(b_key)
        value = np.bincount(group[:nb], weights=reward[sel], minlength=n)
        in_batch = np.bincount(group[:nb], minlength=n) > 0
        last = np.full(n, -1, np.int64)
        np.maximum.at(last, group[:nb], iteration[sel])
        tg = group[nb:]
        truth = np.bincount(tg, weights=g_truth[g_ok], minlength=n)  # a module: its agents' sum
        if kind == AGENT:
            bound = np.zeros(n)
            bound[tg] = g_bound[g_ok]
        else:  # the bound of the module's agents' rewards summed together
            m_bits = np.full(n, 53, np.int64)
            np.minimum.at(m_bits, tg, g_bits[g_ok])
            bound = rounding_bound(
                np.bincount(tg, weights=w.g_n[g_ok], minlength=n), np.bincount(tg, weights=g_abs[g_ok], minlength=n), m_bits,
                w.ep_chunks[(uniq // nm).astype(np.int64)], np.bincount(tg, minlength=n).astype(np.float64),
                unknown=np.bincount(tg, weights=w.g_unknown[g_ok], minlength=n) > 0,
            )
        width = na if kind == AGENT else nm
        key_eid, key_sel = (uniq // width).astype(np.int64), (uniq % width).astype(np.int64)
        out.append((kind, key_eid, key_sel, truth, value, bound, ~in_batch, last))
    n_total = sum(len(x[1]) for x in out)
    ords = ORD_BASE + stream.emitted + np.arange(n_total, dtype=np.int64)
    stream.emitted += n_total
    return Values(
        kind=np.concatenate([np.full(len(x[1]), x[0]) for x in out]).astype(np.int64),
        eid=np.concatenate([x[1] for x in out]),
        agent=np.concatenate([x[2] if x[0] == AGENT else np.full(len(x[1]), -1) for x in out]).astype(np.int64),
        module=np.concatenate([x[2] if x[0] == MODULE else np.full(len(x[1]), -1) for x in out]).astype(np.int64),
        truth=np.concatenate([x[3] for x in out]),
        value=np.concatenate([x[4] for x in out]),
        bound=np.concatenate([x[5] for x in out]),
        missing=np.concatenate([x[6] for x in out]),
        iteration=np.concatenate([x[7] for x in out]),
        ord=ords,
        unbatched=np.flatnonzero(judged & ~has_batch),
        orphans=np.flatnonzero(w.closed & ~w.has_raw & (np.bincount(w.b_eid, minlength=E) > 0)),
        clipped=int((clipped & judged[w.g_eid] & has_batch[w.g_eid]).sum()),
    )
