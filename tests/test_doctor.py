"""``reward-audit doctor`` through click's CliRunner: the installed Ray alone, a recorded
run folder, a Tune trial's params.json / result.json, and bad input."""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
from click.testing import CliRunner

from reward_audit import doctor as doctor_module
from reward_audit.cli import main

RUNS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "runs")
RAY212 = os.path.join(RUNS, "ray212_newstack_leak")
RAY253 = os.path.join(RUNS, "ray253_shared_module_drop")
HOW = "to check: `config.callbacks(RewardAuditCallback)` (`from reward_audit import RewardAuditCallback`), train, then `reward-audit compare <trial dir>`"
PRE_OBS = "by design  pre-observation-rewards: every Ray version: shown as EXCLUDED if the env pays an agent before its first observation (turn-based games)"
METRICS_ONLY = "known to affect only the reported metrics, not training"


def doctor(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["doctor", *args])
    return result.exit_code, result.output.splitlines()  # click >= 8.2: stdout and stderr, interleaved


def test_installed_ray_260_says_both_bugs_are_fixed(monkeypatch):
    monkeypatch.setattr(doctor_module, "_installed_ray", lambda: "2.60.0")
    code, lines = doctor()
    assert code == 0
    assert lines == [
        "Ray 2.60.0 (installed); no config given (pass a trial dir, params.json or run folder for a closer look)",
        "ok         chunk-leak: not in Ray 2.60.0: affects 2.10 – 2.23 (ray-project/ray#45057, fixed in Ray 2.24 by #45543)",
        "ok         shared-module-overwrite: not in Ray 2.60.0: affects 2.20 – 2.53 (ray-project/ray#59860, fixed in Ray 2.54 by #60234)",
        "CHECK      waiting-player-cut: Ray 2.60.0, if on the new API stack: exposed if the env is turn-based, its last step observes not every "
        "player (OpenSpiel) and episodes are longer than rollout_fragment_length; affects training too",
        f"CHECK      clip-rewards: Ray 2.60.0, if on the old API stack: exposed if `clip_rewards` is set (or the env is Atari); {METRICS_ONLY}",
        PRE_OBS,
        HOW,
    ]


def test_reads_the_installed_ray_from_its_metadata():
    try:
        installed = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    code, lines = doctor()
    assert code == 0 and len(lines) == 7
    assert lines[0].startswith(f"Ray {installed} (installed)" if installed else "Ray (unknown) (Ray is not installed; pass `--ray-version`)")


def test_ray212_run_folder_names_the_chunk_leak():
    code, lines = doctor(RAY212)
    assert code == 0
    assert lines[0].startswith("Ray 2.12.0 (from ") and lines[0].endswith("; API stack: new; modules: p1, p2, p3, p4; rollout_fragment_length=16")
    assert lines[1] == (
        "CHECK      chunk-leak: Ray 2.12.0, new API stack: exposed if several agents play episodes longer than rollout_fragment_length=16 "
        f"(ray-project/ray#45057, fixed in Ray 2.24 by #45543); {METRICS_ONLY}"
    )
    assert lines[2].startswith("ok         shared-module-overwrite: not in Ray 2.12.0: affects 2.20 – 2.53")
    assert lines[3] == "ok         waiting-player-cut: not in Ray 2.12.0: affects 2.40 and later"
    assert lines[4] == "ok         clip-rewards: new API stack; it affects the old stack only"
    assert lines[-1] == f"check now: `reward-audit compare {RAY212}` (this run was recorded with reward_audit)"


def test_ray253_run_json_is_exposed_to_the_shared_module_overwrite():
    code, lines = doctor(os.path.join(RAY253, "reward_audit", "run.json"))
    assert code == 0
    assert lines[2] == (
        "EXPOSED    shared-module-overwrite: Ray 2.53.0, new API stack: every agent maps to the one module `shared`: exposed as soon as "
        f"the env has several agents (ray-project/ray#59860, fixed in Ray 2.54 by #60234); {METRICS_ONLY}"
    )
    assert lines[-1] == f"check now: `reward-audit compare {os.path.join(RAY253, 'reward_audit')}` (this run was recorded with reward_audit)"


# A Tune trial dir: params.json is the algorithm config (AlgorithmConfig.to_dict(), non-JSON values as strings).
PARAMS_212 = {
    "_enable_new_api_stack": True,
    "env_runner_cls": "<class 'ray.rllib.env.multi_agent_env_runner.MultiAgentEnvRunner'>",
    "rollout_fragment_length": 16,
    "batch_mode": "truncate_episodes",
    "policies": {"p1": None, "p2": None},
    "clip_rewards": None,
}
PARAMS_253_SHARED = {"enable_env_runner_and_connector_v2": True, "policies": ["shared"], "rollout_fragment_length": "auto"}
PARAMS_OLD_CLIP = {"enable_env_runner_and_connector_v2": False, "policies": {"p0": None, "p1": None}, "clip_rewards": True}


@pytest.mark.parametrize(
    "params, ray_version, expected",
    [
        (PARAMS_212, "2.12.0", {"chunk-leak": "CHECK", "shared-module-overwrite": "ok", "waiting-player-cut": "ok", "clip-rewards": "ok"}),
        ({**PARAMS_212, "batch_mode": "complete_episodes"}, "2.12.0", {"chunk-leak": "ok"}),
        (PARAMS_212, "2.24.0", {"chunk-leak": "ok", "shared-module-overwrite": "CHECK"}),
        (PARAMS_253_SHARED, "2.53.0", {"chunk-leak": "ok", "shared-module-overwrite": "EXPOSED", "waiting-player-cut": "CHECK", "clip-rewards": "ok"}),
        ({**PARAMS_253_SHARED, "batch_mode": "complete_episodes"}, "2.60.0", {"waiting-player-cut": "ok"}),
        (PARAMS_253_SHARED, "2.54.0", {"shared-module-overwrite": "ok"}),
        (PARAMS_OLD_CLIP, "2.60.0", {"chunk-leak": "ok", "shared-module-overwrite": "ok", "waiting-player-cut": "ok", "clip-rewards": "EXPOSED"}),
        ({**PARAMS_OLD_CLIP, "clip_rewards": None}, "2.60.0", {"clip-rewards": "ok"}),
        ({**PARAMS_OLD_CLIP, "enable_env_runner_and_connector_v2": True}, "2.60.0", {"clip-rewards": "ok"}),
    ],
)
@pytest.mark.parametrize("layout", ["params.json", "result.json", "dir"])
def test_tune_trial_config(tmp_path, params, ray_version, expected, layout):
    if layout == "result.json":
        (tmp_path / "result.json").write_text(json.dumps({"training_iteration": 1, "config": params}) + "\n" + json.dumps({"training_iteration": 2}) + "\n")
        path = tmp_path / "result.json"
    else:
        (tmp_path / "params.json").write_text(json.dumps(params))
        path = tmp_path / "params.json" if layout == "params.json" else tmp_path
    code, lines = doctor(str(path), "--ray-version", ray_version)
    assert code == 0 and lines[0].startswith(f"Ray {ray_version} (--ray-version); API stack: ")
    status = {line[11:].split(":")[0]: line[:10].strip() for line in lines[1:6]}
    assert {k: status[k] for k in expected} == expected
    assert lines[5] == PRE_OBS and lines[-1] == HOW


def test_run_json_wins_over_params_json(tmp_path):
    """A trial dir with both: the recorded Ray version and stack come from run.json."""
    (tmp_path / "reward_audit").mkdir()
    with open(os.path.join(RAY212, "reward_audit", "run.json")) as f:
        (tmp_path / "reward_audit" / "run.json").write_text(f.read())
    (tmp_path / "params.json").write_text(json.dumps(PARAMS_OLD_CLIP))
    code, lines = doctor(str(tmp_path))
    assert code == 0 and "Ray 2.12.0 (from " in lines[0] and "API stack: new" in lines[0]
    assert lines[1].startswith("CHECK      chunk-leak: Ray 2.12.0, new API stack")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing"), "does not exist; pass a Tune trial dir, its `params.json`, or a reward_audit run folder"),
        (lambda p: str(p), "holds no `run.json`, `params.json` or `result.json`; pass a Tune trial dir or a reward_audit run folder"),
        (lambda p: (p / "params.json").write_text("{not json") and str(p / "params.json"), "cannot be read as JSON"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, make, message):
    code, lines = doctor(make(tmp_path))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
