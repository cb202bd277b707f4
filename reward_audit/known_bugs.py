"""Known RLlib reporting problems, one table: which Ray versions and API stacks, which issue
and fix, whether training is affected, and how each one looks in an ``Audit``.

``compare`` adds one note per problem an audit matches (``notes_for``)::

    note: matches a known RLlib bug: Ray 2.10 – 2.23 chunk leak ... (ray-project/ray#45057,
    fixed in Ray 2.24 by #45543); known to affect only the reported metrics, not training

``reward-audit doctor`` (``doctor.py``) reads the same table to say, before any training,
which of them a Ray version and config are exposed to; ``docs/known_bugs.md`` is generated
from it (``markdown()``).

Version ranges were checked in RLlib's source of the released wheels
(``ray/rllib/env/multi_agent_env_runner.py``, ``MultiAgentEnvRunner.get_metrics()``) and, for
the recorded versions, by real runs (``fixtures/runs/``, ``make test-versions``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from .audit import Verdict

if TYPE_CHECKING:
    from .audit import Audit, Finding

Version = tuple[int, int]


def version_tuple(version: str | None) -> Version | None:
    """``"2.12.0"`` -> ``(2, 12)``; ``None`` for anything else."""
    match = re.match(r"\s*(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _show(v: Version) -> str:
    return f"{v[0]}.{v[1]}"


@dataclass(frozen=True)
class KnownBug:
    id: str
    title: str
    kind: Literal["bug", "behaviour", "by design"]
    issue: str | None  # where it was reported
    fix: str | None  # the change that fixed it
    first: Version  # first affected release
    fixed_in: Version | None  # first release without it; None: every release since ``first``
    api_stack: Literal["new", "old", "any"]  # "new" includes 2.1x's experimental new stack
    training: bool | None  # True: training is affected too; False: only the reported metrics; None: not checked
    exposed_when: str  # the configuration that triggers it, for `doctor`
    verified: str  # how this repository checked the range
    looks_like: str  # what `compare` shows
    signature: Callable[[Audit], bool] | None = None  # None: `compare` already says it in a finding

    def affects(self, ray_version: str | None) -> bool | None:
        """Whether a Ray version is in the affected range (``None``: unknown version)."""
        v = version_tuple(ray_version)
        if v is None:
            return None
        return self.first <= v and (self.fixed_in is None or v < self.fixed_in)

    @property
    def versions(self) -> str:
        """``2.10 – 2.23`` / ``2.10 and later``."""
        if self.fixed_in is None:
            return f"{_show(self.first)} and later"
        last = (self.fixed_in[0], self.fixed_in[1] - 1)
        return f"{_show(self.first)} – {_show(last)}"

    @property
    def reference(self) -> str:
        """``ray-project/ray#45057, fixed in Ray 2.24 by #45543``."""
        parts = [self.issue] if self.issue else []
        if self.fixed_in is not None:
            parts.append(f"fixed in Ray {_show(self.fixed_in)}" + (f" by {self.fix}" if self.fix else ""))
        return ", ".join(parts)

    @property
    def impact(self) -> str:
        if self.training is None:
            return "whether training is affected was not checked"
        return "affects training too" if self.training else "known to affect only the reported metrics, not training"

    def note(self) -> str:
        """The line ``compare`` adds to an audit that matches."""
        ref = f" ({self.reference})" if self.reference else ""
        return f"matches a known RLlib {self.kind}: {self.title}{ref}; {self.impact}"


# --------------------------------------------------------------------------- signatures
# They read what ``compare`` wrote: the manifest, each finding's verdict and kind, its
# message ("k/n wrong values come from multi-chunk episodes", compare.summarize) and its
# explanation patterns ("reported = truth − agent 0's final-chunk rewards", "reported = Σ
# clip(r)", attribution.explain). tests/test_known_bugs.py holds them to the recorded runs.

_MULTI_CHUNK = re.compile(r"(\d+)/(\d+) wrong values come from multi-chunk episodes")


def _in_range(bug: KnownBug, audit: Audit) -> bool:
    stack = audit.manifest.get("api_stack")
    return bool(bug.affects(audit.manifest.get("ray_version"))) and (bug.api_stack == "any" or stack == bug.api_stack)


def _failing(audit: Audit, verdict: Verdict, kinds: tuple[str, ...]) -> list[Finding]:
    return [f for f in audit.findings if f.verdict is verdict and f.kind in kinds]


def _chunk_leak(audit: Audit) -> bool:
    """A LEAK whose wrong values all come from episodes sampled in several chunks."""

    def multi_chunk(f: Finding) -> bool:
        m = _MULTI_CHUNK.search(f.message)
        return bool(m) and int(m.group(1)) == int(m.group(2)) > 0

    return _in_range(CHUNK_LEAK, audit) and any(multi_chunk(f) for f in _failing(audit, Verdict.LEAK, ("module", "policy", "agent")))


def _own_agents(f: Finding) -> set[str]:
    """Agents a module finding counts as its own: those the explanation says it missed (a
    DROP misses its own agents' rewards) and those the attribution marks ``(own)``."""
    missed = set(re.findall(r"agent (\S+?)'s", f.message))
    counted = set(re.findall(r"agent (\S+) (?:earlier|final) chunks \(own\)", f.attribution or ""))
    return missed | counted


def _shared_module(audit: Audit) -> bool:
    """A DROP on a module that several agents feed (the per-agent values are not the bug)."""
    return _in_range(SHARED_MODULE, audit) and any(len(_own_agents(f)) > 1 for f in _failing(audit, Verdict.DROP, ("module",)))


def _clip_rewards(audit: Audit) -> bool:
    """A MISMATCH explained as "reported = Σ clip(r)" with ``clip_rewards`` recorded."""
    clip = audit.manifest.get("clip_rewards")
    if not _in_range(CLIP_REWARDS, audit) or clip in (None, False):
        return False
    return any("reported = Σ clip(r)" in f.message for f in _failing(audit, Verdict.MISMATCH, ("module", "policy", "agent", "episode")))


# --------------------------------------------------------------------------- the table

CHUNK_LEAK = KnownBug(
    id="chunk-leak",
    title="Ray 2.10 – 2.23 chunk leak: an episode sampled in several `sample()` chunks adds the whole "
    "multi-agent return of its earlier chunks to every agent / module value",
    kind="bug",
    issue="ray-project/ray#45057",
    fix="#45543",
    first=(2, 10),
    fixed_in=(2, 24),
    api_stack="new",
    training=False,
    exposed_when="new (2.1x: experimental) API stack, several agents, and episodes longer than `rollout_fragment_length` "
    "(`batch_mode='truncate_episodes'`)",
    verified="recorded on 2.12.0 (fixtures/runs/ray212_newstack_leak); `get_metrics()` source: `+= eps2.get_return()` "
    "in 2.10.0, 2.20.0, 2.23.0, per-agent `return_sa` from 2.24.0; training batches (phase `learning`) CLEAN on 2.12.0 "
    "(fixtures/runs/ray212_seed_learning)",
    looks_like="LEAK; every wrong value from a multi-chunk episode; reported = truth + other agents' earlier-chunk rewards",
    signature=_chunk_leak,
)

SHARED_MODULE = KnownBug(
    id="shared-module-overwrite",
    title="Ray 2.20 – 2.53 shared-module overwrite: a module shared by several agents reports the final chunk "
    "of only the last of its agents",
    kind="bug",
    issue="ray-project/ray#59860",
    fix="#60234",
    first=(2, 20),
    fixed_in=(2, 54),
    api_stack="new",
    training=False,
    exposed_when="new API stack and several agents mapped to one module (a shared policy, self-play)",
    verified="recorded on 2.53.0 (fixtures/runs/ray253_shared_module_drop); `get_metrics()` source: dict comprehension "
    "over `agent_episodes` in 2.20.0 and 2.53.0, `+=` from 2.54.0 (2.12 reports per (agent, module) only); training "
    "batches (phase `learning`) CLEAN on 2.53.0 (tests/versions/test_ray253.py)",
    looks_like="DROP on the shared module; reported = truth − the other agents' final-chunk rewards; per-agent values CLEAN",
    signature=_shared_module,
)

CLIP_REWARDS = KnownBug(
    id="clip-rewards",
    title="old-stack `clip_rewards`: rewards are clipped before RLlib counts them, so every reported return "
    "and dashboard is a sum of clipped rewards",
    kind="behaviour",
    issue=None,
    fix=None,
    first=(2, 10),
    fixed_in=None,
    api_stack="old",
    training=False,
    exposed_when="old API stack with `clip_rewards` set (`True` or a float) or an Atari env",
    verified="real runs on 2.60 (tests/test_e2e_oldstack.py); `ClipRewardAgentConnector`, `connectors/util.py` (the new "
    "stack clips in the learner connector, after the metrics)",
    looks_like="MISMATCH; reported = Σ clip(r) in every wrong value",
    signature=_clip_rewards,
)

def _waiting_player(audit: Audit) -> bool:
    """A DROP in the training batches (phase ``learning``) beside a DROP in the metrics."""
    learning = [f for f in _failing(audit, Verdict.DROP, ("module", "agent")) if f.phase == "learning"]
    metrics = [f for f in _failing(audit, Verdict.DROP, ("module", "agent", "policy", "episode")) if f.phase in ("train", "evaluation")]
    return _in_range(WAITING_PLAYER, audit) and bool(learning) and bool(metrics)


WAITING_PLAYER = KnownBug(
    id="waiting-player-cut",
    title="turn-based episodes cut by `sample()`: when the last step observes nobody (OpenSpiel), a player waiting for "
    "its turn is not carried into the next chunk and its final reward is discarded — from the metrics and from the "
    "training batch",
    kind="bug",
    issue=None,  # found by reward_audit; not reported upstream yet
    fix=None,
    first=(2, 40),
    fixed_in=None,
    api_stack="new",
    training=True,
    exposed_when="new API stack, a turn-based env whose final step observes not every player, episodes longer than "
    "`rollout_fragment_length`",
    verified="real runs on 2.53.0 and 2.60.0 (tests/versions: TurnBasedEnv with `final_obs='none'`, one episode by hand; "
    "tests/envs: OpenSpiel connect four); 2.12's experimental stack keeps the reward; releases between 2.40 and 2.53 are "
    "assumed to share 2.53's `MultiAgentEpisode.cut()` (2.60 `multi_agent_episode.py:935-1001`, `add_env_step` :574-583)",
    looks_like="DROP in a few multi-chunk episodes, in the metrics and in phase `learning` with the same values",
    signature=_waiting_player,
)

PRE_OBSERVATION = KnownBug(
    id="pre-observation-rewards",
    title="rewards paid before or with an agent's first observation are never counted (turn-based envs)",
    kind="by design",
    issue=None,
    fix=None,
    first=(2, 10),
    fixed_in=None,
    api_stack="any",
    training=None,
    exposed_when="an env that pays an agent before it has observed (a second player's reward on the first move)",
    verified="every reference version (2.12, 2.53, 2.60), both stacks",
    looks_like="EXCLUDED (a warning, with the amounts)",
    signature=None,  # compare's EXCLUDED finding says it already
)

KNOWN_BUGS: tuple[KnownBug, ...] = (CHUNK_LEAK, SHARED_MODULE, WAITING_PLAYER, CLIP_REWARDS, PRE_OBSERVATION)


def matches(audit: Audit) -> list[KnownBug]:
    """The known problems whose signature ``audit`` shows."""
    return [bug for bug in KNOWN_BUGS if bug.signature is not None and bug.signature(audit)]


def with_known_bugs(audit: Audit) -> Audit:
    """``audit`` with one note per known problem it matches."""
    import dataclasses

    found = matches(audit)
    return dataclasses.replace(audit, notes=audit.notes + tuple(b.note() for b in found)) if found else audit


_TRAINING = {True: "yes", False: "no, metrics only", None: "not checked"}


def markdown() -> str:
    """docs/known_bugs.md, generated from the table."""
    lines = [
        "# Known RLlib reporting problems",
        "",
        "<!-- generated by `python -m reward_audit.docsgen` from reward_audit/known_bugs.py; do not edit by hand -->",
        "",
        "`reward-audit compare` adds a note when an audit matches one of these; `reward-audit doctor` says, from the "
        "Ray version and the config alone, which of them a setup is exposed to. Details per Ray version: "
        "[ray_versions.md](ray_versions.md).",
        "",
        "| id | Ray | stack | reported / fixed | training? | exposed when | compare shows |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in KNOWN_BUGS:
        stack = {"new": "new", "old": "old", "any": "both"}[b.api_stack]
        lines.append(
            f"| `{b.id}` | {b.versions} | {stack} | {b.reference or b.kind} | {_TRAINING[b.training]} "
            f"| {b.exposed_when} | {b.looks_like} |"
        )
    lines += ["", "## What each one is, and how its range was checked", ""]
    for b in KNOWN_BUGS:
        lines += [f"* **`{b.id}`** — {b.title}. Checked: {b.verified}.", ""]
    return "\n".join(lines)
