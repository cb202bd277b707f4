"""``reward-audit doctor``: before any training, which known RLlib reporting problems
(``known_bugs.py``) a Ray version and an algorithm config are exposed to, and how to check.

    $ reward-audit doctor fixtures/runs/ray212_newstack_leak
    Ray 2.12.0 (from fixtures/runs/ray212_newstack_leak/reward_audit/run.json); API stack: new; modules: p1, p2, p3, p4; rollout_fragment_length=16
    CHECK      chunk-leak: Ray 2.12.0, new API stack: exposed if several agents play episodes longer than rollout_fragment_length=16 (ray-project/ray#45057, fixed in Ray 2.24 by #45543); known to affect only the reported metrics, not training
    ok         shared-module-overwrite: not in Ray 2.12.0: affects 2.20 – 2.53 (ray-project/ray#59860, fixed in Ray 2.54 by #60234)
    ok         waiting-player-cut: not in Ray 2.12.0: affects 2.40 and later
    ok         clip-rewards: new API stack; it affects the old stack only
    by design  pre-observation-rewards: every Ray version: shown as EXCLUDED if the env pays an agent before its first observation (turn-based games)
    check now: `reward-audit compare fixtures/runs/ray212_newstack_leak` (this run was recorded with reward_audit)

Statuses: ``EXPOSED`` (version, stack and config all say so), ``CHECK`` (in the affected
range; depends on something the config does not say, e.g. episode lengths), ``ok``, ``by design``.

The setup comes from, in this order: ``--ray-version``; a reward_audit run folder's
``run.json`` (what the callback recorded); a Tune trial's ``params.json`` (the algorithm
config) or ``result.json`` (its ``config``); the installed Ray (read from its package
metadata, not imported). Nothing is trained and Ray is not imported.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from typing import Any, Callable

from .errors import CorruptRunError, RunNotFoundError
from .known_bugs import KNOWN_BUGS, KnownBug

CHECK_HOW = "`config.callbacks(RewardAuditCallback)` (`from reward_audit import RewardAuditCallback`), train, then `reward-audit compare <trial dir>`"


@dataclass(frozen=True)
class Setup:
    """What doctor knows about a run; ``None``: not known."""

    ray_version: str | None
    ray_source: str  # where the version came from
    api_stack: str | None = None  # "new" / "old"
    modules: tuple[str, ...] | None = None
    rollout_fragment_length: Any = None
    batch_mode: str | None = None
    clip_rewards: Any = None
    config_source: str | None = None  # the file the config was read from
    run_folder: str | None = None  # a reward_audit run folder to `compare` now

    def describe(self) -> str:
        parts = [f"Ray {self.ray_version or '(unknown)'} ({self.ray_source})"]
        if self.config_source is None:
            parts.append("no config given (pass a trial dir, params.json or run folder for a closer look)")
        else:
            parts.append(f"API stack: {self.api_stack or 'unknown'}")
            if self.modules is not None:
                parts.append(f"modules: {', '.join(self.modules)}")
            if self.rollout_fragment_length is not None:
                parts.append(f"rollout_fragment_length={self.rollout_fragment_length}")
            if self.clip_rewards not in (None, False):
                parts.append(f"clip_rewards={self.clip_rewards!r}")
        return "; ".join(parts)


# --------------------------------------------------------------------------- reading the setup


def _installed_ray() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:
        return None


def _read_json(path: str, first_line: bool = False) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.readline() if first_line else f.read()
        data = json.loads(text)
    except (OSError, ValueError) as e:
        raise CorruptRunError(f"{path}: cannot be read as JSON ({e}); pass a Tune trial dir, its `params.json`, or a run folder") from e
    if not isinstance(data, dict):
        raise CorruptRunError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _policies(config: dict) -> tuple[str, ...] | None:
    policies = config.get("policies")
    if policies is None and isinstance(config.get("multiagent"), dict):  # Ray < 2.x's nested layout
        policies = config["multiagent"].get("policies")
    if isinstance(policies, dict):
        return tuple(str(p) for p in policies)
    if isinstance(policies, (list, tuple)):
        return tuple(str(p) for p in policies)
    if isinstance(policies, str) and policies:  # a set serialised by Tune's fallback encoder
        return tuple(p.strip(" '\"") for p in policies.strip("{}()[]").split(",") if p.strip(" '\""))
    return None


def _api_stack(config: dict) -> str | None:
    """Ray 2.4x+: ``enable_env_runner_and_connector_v2``; Ray 2.1x: the env runner class (the
    experimental stack needs ``env_runner_cls=MultiAgentEnvRunner``, as ``capture.uses_new_stack``)."""
    flag = config.get("enable_env_runner_and_connector_v2")
    if isinstance(flag, bool):
        return "new" if flag else "old"
    runner = str(config.get("env_runner_cls") or "")
    if "EnvRunner" in runner:
        return "new"
    if "_enable_new_api_stack" in config or "enable_connectors" in config:
        return "old"
    return None


def _from_config(config: dict, source: str) -> dict:
    return {
        "api_stack": _api_stack(config),
        "modules": _policies(config),
        "rollout_fragment_length": config.get("rollout_fragment_length"),
        "batch_mode": config.get("batch_mode"),
        "clip_rewards": config.get("clip_rewards"),
        "config_source": source,
    }


def _from_manifest(manifest: dict, source: str) -> dict:
    return {
        "api_stack": manifest.get("api_stack"),
        "modules": tuple(str(p) for p in manifest["policies"]) if isinstance(manifest.get("policies"), list) else None,
        "rollout_fragment_length": manifest.get("rollout_fragment_length"),
        "batch_mode": manifest.get("batch_mode"),
        "clip_rewards": manifest.get("clip_rewards"),
        "config_source": source,
        "ray_version": manifest.get("ray_version"),
        "run_folder": os.path.dirname(source),
    }


def read_setup(path: str | None = None, ray_version: str | None = None) -> Setup:
    """The setup of ``path`` (a trial dir, a run folder, or one of ``run.json``,
    ``params.json``, ``result.json``), else of the installed Ray alone."""
    found: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise RunNotFoundError(f"{path}: does not exist; pass a Tune trial dir, its `params.json`, or a reward_audit run folder")
        files = [path] if os.path.isfile(path) else [
            os.path.join(path, name) for name in ("run.json", os.path.join("reward_audit", "run.json"), "params.json", "result.json")
        ]
        for file in files:
            if not os.path.isfile(file):
                continue
            if os.path.basename(file) == "result.json":
                config = _read_json(file, first_line=True).get("config")
                if isinstance(config, dict):
                    found = {**_from_config(config, file), **found}
                continue
            data = _read_json(file)
            if data.get("tool") == "reward_audit":  # a run.json: what the callback recorded wins over the config
                found = {**found, **{k: v for k, v in _from_manifest(data, file).items() if v is not None}}
            else:  # params.json: the algorithm config
                found = {**_from_config(data, file), **found}
        if not found:
            raise RunNotFoundError(f"{path}: holds no `run.json`, `params.json` or `result.json`; pass a Tune trial dir or a reward_audit run folder")
    if ray_version is not None:
        found["ray_version"], source = ray_version, "--ray-version"
    elif found.get("ray_version"):
        source = f"from {found['config_source']}"
    else:
        found["ray_version"] = _installed_ray()
        source = "installed" if found["ray_version"] else "Ray is not installed; pass `--ray-version`"
    return Setup(ray_source=source, **found)


# --------------------------------------------------------------------------- per problem: the config's part

Condition = Callable[[Setup], tuple]  # -> (exposed: True / False / None = cannot tell, why)


def _cut_by_sample(s: Setup, never: str, exposed_if: str) -> tuple[bool | None, str]:
    """Bugs that need an episode cut by ``sample()``: not with complete episodes."""
    if s.batch_mode == "complete_episodes":
        return False, f"`batch_mode='complete_episodes'`: episodes are never {never}"
    length = f"rollout_fragment_length={s.rollout_fragment_length}" if s.rollout_fragment_length is not None else "rollout_fragment_length"
    return None, f"exposed if {exposed_if} {length}"


def _chunk_leak(s: Setup) -> tuple[bool | None, str]:
    return _cut_by_sample(s, "split into chunks", "several agents play episodes longer than")


def _shared_module(s: Setup) -> tuple[bool | None, str]:
    if s.modules is not None and len(s.modules) == 1 and s.modules[0] != "default_policy":
        return True, f"every agent maps to the one module `{s.modules[0]}`: exposed as soon as the env has several agents"
    count = f" to one of the {len(s.modules)} modules" if s.modules else " to one module"
    return None, f"exposed if the policy mapping sends several agents{count} (self-play, a shared policy)"


def _waiting_player(s: Setup) -> tuple[bool | None, str]:
    return _cut_by_sample(s, "cut by `sample()`", "the env is turn-based, its last step observes not every player (OpenSpiel) and episodes are longer than")


def _clip_rewards(s: Setup) -> tuple[bool | None, str]:
    if s.config_source is None:
        return None, "exposed if `clip_rewards` is set (or the env is Atari)"
    if s.clip_rewards is True or type(s.clip_rewards) is float:
        return True, f"`clip_rewards={s.clip_rewards!r}`: every reported return is a sum of clipped rewards"
    return False, "`clip_rewards` is not set (an Atari env would still clip)"


def _pre_observation(s: Setup) -> tuple[bool | None, str]:
    return None, "shown as EXCLUDED if the env pays an agent before its first observation (turn-based games)"


CONDITIONS: dict[str, Condition] = {
    "chunk-leak": _chunk_leak,
    "shared-module-overwrite": _shared_module,
    "waiting-player-cut": _waiting_player,
    "clip-rewards": _clip_rewards,
    "pre-observation-rewards": _pre_observation,
}


def assess(bug: KnownBug, setup: Setup) -> tuple[str, str]:
    """``(status, why)``; status is ``EXPOSED``, ``CHECK`` (depends on something the config
    does not say), ``ok`` or ``by design``."""
    where = f" ({bug.reference})" if bug.reference else ""
    in_range = bug.affects(setup.ray_version)
    if in_range is False:
        return "ok", f"not in Ray {setup.ray_version}: affects {bug.versions}{where}"
    if bug.api_stack != "any" and setup.api_stack not in (None, bug.api_stack):
        return "ok", f"{setup.api_stack} API stack; it affects the {bug.api_stack} stack only"
    exposed, why = CONDITIONS[bug.id](setup)
    if exposed is False:
        return "ok", why
    if bug.kind == "by design":
        return "by design", f"every Ray version: {why}"
    version = f"Ray {setup.ray_version}" if in_range else f"unknown Ray version (affects {bug.versions})"
    stack = f"{setup.api_stack} API stack" if setup.api_stack else f"if on the {bug.api_stack} API stack"
    status = "EXPOSED" if exposed and in_range and setup.api_stack else "CHECK"
    return status, f"{version}, {stack}: {why}{where}; {bug.impact}"


def doctor(path: str | None = None, ray_version: str | None = None) -> list[str]:
    """The lines ``reward-audit doctor`` prints: the setup, one per known problem, how to check."""
    setup = read_setup(path, ray_version)
    lines = [setup.describe()]
    for bug in KNOWN_BUGS:
        status, why = assess(bug, setup)
        lines.append(f"{status:<10} {bug.id}: {why}")
    if setup.run_folder is not None:
        folder = path if path is not None and os.path.isdir(path) else setup.run_folder
        lines.append(f"check now: `reward-audit compare {shlex.quote(folder)}` (this run was recorded with reward_audit)")
    else:
        lines.append(f"to check: {CHECK_HOW}")
    return lines
