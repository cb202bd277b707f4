"""Proven on real games: RLlib 2.60's own multi-agent example envs, OpenSpiel through
``OpenSpielEnv`` with RLlib's ``SelfPlayCallback``, PettingZoo classic games through
``PettingZooEnv`` and mpe2 through ``ParallelPettingZooEnv``. Tiny PPO runs (train batch
128, a local env runner, 16-step fragments so episodes span several chunks).

Each case is one row of ``CASES`` and two tests:

* ``test_audit_is_clean``: RLlib attributes these games right, so the audit must show no
  failing verdict (only the warnings the row allows);
* ``test_injected_fault_is_caught`` (new API stack only: ``capture/inject.py``): the row's
  fault is injected into RLlib's metrics and the audit must name it with the row's label.

Which fault a row injects follows from the game: a ``leak`` only changes a value when other
agents were paid in an earlier chunk, a ``drop`` only when several agents share a module.
A leak of *negative* rewards is a shortfall, which the audit deliberately calls MISMATCH,
never LEAK (``attribution.explain``; ``tests/test_fail_closed.py``); so games that pay
penalties (Pendulum, TicTacToe, simple_spread) prove ``drop`` with a shared module.
``docs/tested_environments.md`` is this table in prose.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

ray = pytest.importorskip("ray", reason="end-to-end tests need ray[rllib]; `make test-envs` installs it")

from helpers import new_stack_ppo_config, old_stack_ppo_config, train  # noqa: E402  (tests/helpers.py)
from reward_audit import RewardAuditCallback, Verdict, compare  # noqa: E402
from reward_audit.envs import map_all_shared, map_by_id  # noqa: E402

pytestmark = pytest.mark.rllib


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_instance):  # one Ray for the whole module (tests/conftest.py)
    yield


# --------------------------------------------------------------------------- env builders
# Imported lazily: collecting this module must not need PettingZoo / OpenSpiel / mpe2.


def _register(name: str, creator: Callable[[dict], Any]) -> str:
    from ray.tune.registry import register_env

    register_env(name, creator)
    return name


def rllib_example(cls_name: str) -> Any:
    from ray.rllib.examples.envs.classes import multi_agent

    if hasattr(multi_agent, cls_name):
        return getattr(multi_agent, cls_name)
    module = {"RockPaperScissors": "rock_paper_scissors", "TicTacToe": "tic_tac_toe"}[cls_name]
    return getattr(__import__(f"ray.rllib.examples.envs.classes.multi_agent.{module}", fromlist=[cls_name]), cls_name)


def pettingzoo_classic(game: str) -> str:
    def creator(config: dict) -> Any:
        import importlib

        from ray.rllib.env.wrappers.pettingzoo_env import PettingZooEnv

        return PettingZooEnv(importlib.import_module(f"pettingzoo.classic.{game}").env())

    return _register(f"reward_audit_pz_{game}", creator)


def mpe2_parallel(game: str, **kwargs: Any) -> str:
    def creator(config: dict) -> Any:
        import importlib

        from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv

        return ParallelPettingZooEnv(importlib.import_module(f"mpe2.{game}").parallel_env(**kwargs))

    return _register(f"reward_audit_mpe2_{game}", creator)


def open_spiel(game: str) -> str:
    def creator(config: dict) -> Any:
        import pyspiel
        from ray.rllib.env.wrappers.open_spiel import OpenSpielEnv

        return OpenSpielEnv(pyspiel.load_game(game))

    return _register(f"reward_audit_open_spiel_{game}", creator)


# --------------------------------------------------------------------------- mapping fns


def _coin(episode: Any, salt: str) -> int:
    """A fair coin per (episode, salt), the same in every process (crc32, not ``hash``)."""
    episode_id = getattr(episode, "id_", None) or getattr(episode, "episode_id", 0)
    return zlib.crc32(f"{episode_id}/{salt}".encode()) % 2


def seats_per_episode(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """Each player independently plays ``main`` or ``opponent``, drawn per episode: all four
    seatings occur, so some episodes have both players on one module."""
    return ("main", "opponent")[_coin(episode, str(agent_id))]


def map_player_index(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """``player_0`` -> ``p0``."""
    return f"p{str(agent_id).rsplit('_', 1)[-1]}"


def map_tag_teams(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """simple_tag: the adversaries share ``adversary``, the good agents ``good``."""
    return "adversary" if str(agent_id).startswith("adversary") else "good"


def map_open_spiel_self_play(agent_id: Any, episode: Any, **kwargs: Any) -> str:
    """RLlib's ``self_play_with_open_spiel.py`` mapping: ``main`` against ``random``, seats by episode."""
    return "main" if hash(episode.id_) % 2 == agent_id else "random"


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    env: Callable[[], Any]  # returns an env class or a registered name (called in the test)
    env_config: dict
    policies: tuple[str, ...]
    mapping: Callable
    stack: str = "new"
    iterations: int = 2
    fragment: int = 16
    fault: str | None = None  # injected in test_injected_fault_is_caught (new stack only)
    caught: dict = field(default_factory=dict)  # (phase, kind, key) -> the verdict the fault must get
    caught_all: bool = True  # False: at least one of ``caught`` (seats drawn per episode may spare one)
    warnings: frozenset = frozenset({Verdict.INCOMPLETE})
    flatten: bool = False  # FlattenObservations (Dict / Discrete observations)
    configure: Callable[[Any], Any] | None = None  # anything else the game's RLlib example sets
    rllib_drops: bool = False  # RLlib 2.60 loses terminal rewards across cut() here (see below)
    why: str = ""


def _flatten(env: Any = None, spaces: Any = None, device: Any = None) -> Any:
    from ray.rllib.connectors.env_to_module import FlattenObservations

    return FlattenObservations(multi_agent=True)


def _self_play_callback(win_rate_threshold: float) -> Any:
    """RLlib's ``SelfPlayCallback`` with one repair: its ``on_episode_end`` reads
    ``episode.get_rewards()``, which in Ray 2.60 raises ``IndexError: list index out of
    range`` ("Trying to get index 0 from []") on a final chunk in which a player has no step
    (OpenSpiel's last step observes nobody) — seen in 2 of 3 runs of the plain example
    config with 16- and 128-step fragments, *without* reward_audit. Here the win is read from
    main's own single-agent episode; ``on_train_result`` (adding snapshots, re-mapping) is
    RLlib's unchanged."""
    from ray.rllib.examples.multi_agent.utils.self_play_callback import SelfPlayCallback

    class RepairedSelfPlayCallback(SelfPlayCallback):
        def on_episode_end(self, *, episode, metrics_logger, **kwargs) -> None:
            main_agent = 0 if episode.module_for(0) == "main" else 1
            single = episode.agent_episodes.get(main_agent)
            rewards = single.get_rewards() if single is not None else []
            if len(rewards):
                metrics_logger.log_value("win_rate", rewards[-1] == 1.0, reduce="mean", window=100)

    return functools.partial(RepairedSelfPlayCallback, win_rate_threshold=win_rate_threshold)


def _open_spiel_self_play(config: Any) -> Any:
    """As in ``self_play_with_open_spiel.py``: ``random`` is an untrained ``RandomRLModule``
    and ``SelfPlayCallback`` adds a snapshot ``main_v1`` (with a new mapping fn) once main's
    win rate exceeds the threshold — 0 here, so it happens after the first iteration."""
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.rllib.examples.rl_modules.classes.random_rlm import RandomRLModule

    audit = config.callbacks_class
    return (
        config.callbacks([_self_play_callback(0.0), audit])
        .multi_agent(policies_to_train=["main"])
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs={"main": RLModuleSpec(), "random": RLModuleSpec(module_class=RandomRLModule)}))
    )


def _fault_keys(verdict: Verdict, phase_kind_keys: list[tuple[str, str]]) -> dict:
    return {("train", kind, key): verdict for kind, key in phase_kind_keys}


TURN_BASED = frozenset({Verdict.INCOMPLETE, Verdict.EXCLUDED})

CASES = [
    # ------------------------------------------------------------ RLlib 2.60's own example envs
    Case(
        "rllib-multi_agent_cartpole-2", lambda: rllib_example("MultiAgentCartPole"), {"num_agents": 2}, ("p_0", "p_1"), map_by_id,
        fault="leak", caught=_fault_keys(Verdict.LEAK, [("module", "p_0"), ("module", "p_1"), ("agent", "0"), ("agent", "1")]),
    ),
    Case(
        "rllib-multi_agent_cartpole-4-shared", lambda: rllib_example("MultiAgentCartPole"), {"num_agents": 4}, ("shared",), map_all_shared,
        fault="drop", caught=_fault_keys(Verdict.DROP, [("module", "shared")]),
    ),
    Case(
        "rllib-multi_agent_pendulum-shared", lambda: rllib_example("MultiAgentPendulum"), {"num_agents": 2}, ("shared",), map_all_shared,
        iterations=4,  # 200-step episodes: 512 env steps finish 2 of them
        fault="drop", caught=_fault_keys(Verdict.DROP, [("module", "shared")]),
    ),
    Case(
        "rllib-rock_paper_scissors-self_play", lambda: rllib_example("RockPaperScissors"), {}, ("shared",), map_all_shared, flatten=True,
        fault="drop", caught=_fault_keys(Verdict.DROP, [("module", "shared")]),
    ),
    Case(
        "rllib-tic_tac_toe-seats_per_episode", lambda: rllib_example("TicTacToe"), {}, ("main", "opponent"), seats_per_episode,
        iterations=3, warnings=TURN_BASED,
        # A drop needs both players on one module: about a quarter of the episodes, per module.
        fault="drop", caught=_fault_keys(Verdict.DROP, [("module", "main"), ("module", "opponent")]), caught_all=False,
    ),
    Case(
        "rllib-two_step_game-grouped-old_stack", lambda: rllib_example("TwoStepGameWithGroupedAgents"), {}, ("shared",), map_all_shared, stack="old",
    ),
    Case(
        # The new stack needs FlattenObservations for the group's Tuple observation (RLlib's
        # two_step_game_with_grouped_agents.py; without it: "No default encoder config for obs
        # space=Tuple(Discrete(6), Discrete(6))"). One agent, one module: neither a leak nor a
        # drop has anything to move, so the self-test uses `mismatch`.
        "rllib-two_step_game-grouped", lambda: rllib_example("TwoStepGameWithGroupedAgents"), {}, ("shared",), map_all_shared, flatten=True,
        fault="mismatch", caught=_fault_keys(Verdict.MISMATCH, [("module", "shared")]),
    ),
    Case(
        "rllib-two_step_game", lambda: rllib_example("TwoStepGame"), {}, ("p_0", "p_1"), map_by_id, stack="old",
        why="the 2.60 new stack cannot build it (TypeError: 'Discrete' object is not iterable), with or without the audit",
    ),
    Case(
        "rllib-guess_the_number", lambda: rllib_example("GuessTheNumberGame"), {}, ("p_0", "p_1"), map_by_id, stack="old", warnings=TURN_BASED,
        why="the 2.60 new stack cannot build it (TypeError: 'Discrete' object is not iterable), with or without the audit",
    ),
    # ------------------------------------------------------------ OpenSpiel
    Case(
        "open_spiel-connect_four-self_play", lambda: open_spiel("connect_four"), {}, ("main", "random"), map_open_spiel_self_play,
        warnings=TURN_BASED, configure=_open_spiel_self_play, iterations=3,
        # When a sample() ends while a player waits for its turn, RLlib 2.60 can lose that
        # player's reward (its terminal one: OpenSpielEnv's last step observes nobody, see
        # test_rllib_loses_terminal_rewards_across_cut; also a −0.1 illegal-move penalty):
        # the audit shows those values as DROP, in multi-chunk episodes only.
        rllib_drops=True,
        # main never shares a module and connect four pays only at the end: neither a leak nor
        # a drop changes any value, so the self-test uses `mismatch`.
        fault="mismatch", caught=_fault_keys(Verdict.MISMATCH, [("module", "main")]),
    ),
    # ------------------------------------------------------------ PettingZoo (AEC) via PettingZooEnv
    Case(
        "pettingzoo-rps_v2-self_play", lambda: pettingzoo_classic("rps_v2"), {}, ("shared",), map_all_shared, flatten=True, warnings=TURN_BASED,
        fault="drop", caught=_fault_keys(Verdict.DROP, [("module", "shared")]),
    ),
    Case(
        "pettingzoo-tictactoe_v3-self_play", lambda: pettingzoo_classic("tictactoe_v3"), {}, ("shared",), map_all_shared, flatten=True,
        iterations=3, warnings=TURN_BASED,
        fault="drop", caught=_fault_keys(Verdict.DROP, [("module", "shared")]),
    ),
    Case(
        "pettingzoo-connect_four_v3-self_play", lambda: pettingzoo_classic("connect_four_v3"), {}, ("shared",), map_all_shared, flatten=True,
        iterations=3, warnings=TURN_BASED,
        fault="drop", caught=_fault_keys(Verdict.DROP, [("module", "shared")]),
    ),
    # ------------------------------------------------------------ mpe2 (parallel) via ParallelPettingZooEnv
    Case(
        "mpe2-simple_spread_v3-shared", lambda: mpe2_parallel("simple_spread_v3", N=3, max_cycles=25, continuous_actions=False), {}, ("shared",), map_all_shared,
        fault="drop", caught=_fault_keys(Verdict.DROP, [("module", "shared")]),
    ),
    Case(
        "mpe2-simple_tag_v3-teams", lambda: mpe2_parallel("simple_tag_v3", num_good=2, max_cycles=25, continuous_actions=False), {}, ("adversary", "good"), map_tag_teams,
        iterations=3,
        # Two good agents (default 1), so both modules are shared: adversaries are paid only on
        # a collision, which a final chunk often lacks; good agents also pay for leaving the
        # field. A drop shows wherever a final chunk paid something.
        fault="drop", caught=_fault_keys(Verdict.DROP, [("module", "adversary"), ("module", "good")]), caught_all=False,
    ),
]


def build(case: Case, out: str, callback: Any) -> Any:
    make = new_stack_ppo_config if case.stack == "new" else old_stack_ppo_config
    config = make(case.env(), case.env_config, list(case.policies), case.mapping, out, fragment=case.fragment, callback=callback).debugging(seed=0)
    if case.flatten:
        config = config.env_runners(env_to_module_connector=_flatten)
    if case.configure:
        config = case.configure(config)
    return config


def failing(audit: Any) -> list:
    return [f for f in audit.findings if f.verdict.failing]


def rllib_lost_rewards(findings: list) -> list:
    """The findings that are all RLlib 2.60 losing a waiting player's rewards across ``cut()``:
    DROP, every wrong value a DROP (an own agent's rewards missing: its terminal +1/−1, or an
    illegal-move penalty), only in multi-chunk episodes. In connect four "− own final chunk"
    equals "+ the other player's final chunk"; that alternative is listed in the text."""
    return [f for f in findings if f.verdict == Verdict.DROP and f.evidence and all(e.verdict == Verdict.DROP and e.chunks > 1 for e in f.evidence)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_audit_is_clean(case: Case, tmp_path):
    out = str(tmp_path / "out")
    train(build(case, out, None), case.iterations)
    audit = compare(out, max_evidence=1000)
    rllib_drops = rllib_lost_rewards(failing(audit)) if case.rllib_drops else []
    bad = [f for f in failing(audit) if f not in rllib_drops]
    assert not bad, "\n".join(f"{f}: {[(e.chunks, e.explanation) for e in f.evidence]}" for f in bad)
    unexpected = [str(f) for f in audit.findings if f.verdict.warning and f.verdict not in case.warnings]
    assert not unexpected, "\n".join(unexpected)
    compared = [f for f in audit.findings if f.kind in ("module", "policy") and (f.verdict == Verdict.CLEAN or f in rllib_drops)]
    assert compared and all(f.episodes >= 1 for f in compared), audit.findings
    assert_learning_matches_metrics(audit)


def assert_learning_matches_metrics(audit: Any) -> None:
    """Phase ``learning`` (the training batches, docs/learning.md): a value for every module
    the metrics judged; CLEAN wherever RLlib's metrics are right, and where RLlib 2.60 lost a
    waiting player's reward across a cut (connect four) the batch misses the very same
    reward: DROP on the same episodes, with the same values."""
    learning = {(f.kind, f.key): f for f in audit.findings if f.phase == "learning" and not f.verdict.warning}
    judged = {(("module" if f.kind == "policy" else f.kind), f.key) for f in audit.findings if f.phase == "train" and f.kind in ("module", "policy") and not f.verdict.warning}
    assert judged and judged <= set(learning), (sorted(judged), sorted(learning))
    train = {(f.kind, f.key): f for f in audit.findings if f.phase == "train" and not f.verdict.warning}
    for key, f in learning.items():
        assert f.episodes >= 1 and f.verdict in (Verdict.CLEAN, Verdict.DROP), str(f)
        # The old stack reports per policy and no per-agent values: learning's agent values stand alone.
        reported = train.get(key) or train.get(("policy", key[1]) if key[0] == "module" else None)
        if reported is None:
            assert f.verdict == Verdict.CLEAN, str(f)
        elif f.verdict == Verdict.DROP:
            trained_on = {e.episode_id: e.reported for e in f.evidence if e.verdict.failing}
            metrics = {e.episode_id: e.reported for e in reported.evidence if e.verdict.failing}
            assert trained_on.keys() == metrics.keys() and all(abs(trained_on[k] - metrics[k]) < 1e-9 for k in metrics), (key, trained_on, metrics)
        else:
            assert reported.verdict == Verdict.CLEAN, (str(f), str(reported))


FAULT_CASES = [c for c in CASES if c.fault]


@pytest.mark.parametrize("case", FAULT_CASES, ids=[c.id for c in FAULT_CASES])
def test_injected_fault_is_caught(case: Case, tmp_path):
    out = str(tmp_path / "out")
    train(build(case, out, RewardAuditCallback.configured(out, inject_fault=case.fault)), case.iterations)
    audit = compare(out, max_evidence=1000)
    assert not audit.ok
    got = {(f.phase, f.kind, f.key): f for f in audit.findings}
    hits = [key for key, verdict in case.caught.items() if key in got and got[key].verdict == verdict]
    assert hits if not case.caught_all else len(hits) == len(case.caught), (case.caught, got)
    for f in failing(audit):
        if case.rllib_drops and f in rllib_lost_rewards([f]):
            continue
        assert f.verdict == Verdict[case.fault.upper()], (f, [e.explanation for e in f.evidence])  # no other failing label
        assert not any("not a sum" in e.explanation for e in f.evidence) or case.fault == "mismatch", f
    # The fault is injected into RLlib's metrics only: the training batches stay right.
    learning = [f for f in audit.findings if f.phase == "learning" and not f.verdict.warning]
    assert learning and all(f.verdict == Verdict.CLEAN or (case.rllib_drops and f in rllib_lost_rewards([f])) for f in learning), learning


def test_rllib_loses_terminal_rewards_across_cut():
    """What the audit's DROP on OpenSpiel connect four is (Ray 2.60, no reward_audit involved):
    a turn-based episode whose last step observes nobody (as ``OpenSpielEnv`` does), cut by
    ``sample()`` while a player waits for its turn, loses that player's terminal reward in
    ``MultiAgentEpisode``. RLlib knows single-agent steps can be lost when ``cut()`` falls where
    an agent has no observation (ray-project/ray#44677). When this test fails, RLlib fixed it:
    drop ``rllib_drops`` from the OpenSpiel row and update docs/tested_environments.md."""
    import gymnasium as gym
    from ray.rllib.env.multi_agent_episode import MultiAgentEpisode

    def returns(cut_after: int | None, moves: int = 6) -> dict:
        spaces = {0: gym.spaces.Discrete(2), 1: gym.spaces.Discrete(2)}
        chunks = [MultiAgentEpisode(observation_space=spaces, action_space=spaces)]
        chunks[0].add_env_reset(observations={0: 0}, infos={})
        for t in range(moves):
            player, last = t % 2, t == moves - 1
            chunks[-1].add_env_step(
                observations={} if last else {1 - player: 0},
                actions={player: 0},
                rewards={0: 1.0, 1: -1.0} if last else {0: 0.0, 1: 0.0},
                terminateds={0: True, 1: True, "__all__": True} if last else {"__all__": False},
                truncateds={"__all__": False},
                infos={},
            )
            if t == cut_after:
                chunks.append(chunks[-1].cut())
        return {a: sum(c.agent_episodes[a].get_return() for c in chunks if a in c.agent_episodes) for a in (0, 1)}

    assert returns(None) == returns(2) == {0: 1.0, 1: -1.0}  # the env paid +1 / −1
    assert returns(3) == {0: 0.0, 1: -1.0}  # player 0 waited across the cut: its +1 is gone
    assert returns(4) == {0: 0.0, 1: 0.0}
