"""Sampling throughput with vs. without RewardAuditCallback, measured in one run.

Builds the demo config twice (same env, same model; one with the callback, one without),
then alternates rounds of ``env_runner.sample(num_timesteps=N)`` + ``get_metrics()`` + the
driver-side drain/write on both, so machine noise hits both alike. Prints env steps per
second for each and the ratio (with / without; 1.00 = no overhead).

    python benchmarks/bench_overhead.py [--rounds 8] [--steps 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import ray
from ray.rllib.algorithms.callbacks import DefaultCallbacks

from reward_audit.capture.base import drain_runner
from reward_audit.demo import demo_config
from reward_audit.schema import Phase


def build(with_callback: bool, out: str):
    config = demo_config(out, evaluation=False, env_config={"episode_len": 100})
    if not with_callback:
        config = config.callbacks(callbacks_class=DefaultCallbacks)
    return config.build_algo()


def one_round(algo, steps: int, audited: bool) -> float:
    runner = algo.env_runner
    start = time.perf_counter()
    runner.sample(num_timesteps=steps)
    runner.get_metrics()
    if audited:  # what on_train_result does once per iteration
        callbacks = algo.callbacks if isinstance(algo.callbacks, list) else [algo.callbacks]
        next(c for c in callbacks if hasattr(c, "_collector"))._collector.collect(algo, 1, (Phase.TRAIN,))
    else:
        drain_runner(runner)
    return steps / (time.perf_counter() - start)


def _time_batch_capture() -> list:
    """Accumulate the time ``on_sample_end`` spends reading the training batch (measured
    rounds only; the local env runner runs in this process)."""
    from reward_audit.capture.newstack import NewStackAdapter

    spent = [0.0, 0]
    original = NewStackAdapter.batch_ends

    def batch_ends(self, recorder, samples):
        start = time.perf_counter()
        try:
            return original(self, recorder, samples)
        finally:
            spent[0] += time.perf_counter() - start
            spent[1] += 1

    NewStackAdapter.batch_ends = batch_ends
    return spent


def bare_tap_cost(steps: int = 20000) -> tuple[float, float]:
    """Worst case: the bare env stepped in a loop, with and without the tap (no RLlib)."""
    from reward_audit.capture.base import install_tap
    from reward_audit.envs import ScaledRewardsEnv
    from reward_audit.recorder import RunnerRecorder

    def run(tapped: bool) -> float:
        env = ScaledRewardsEnv({"episode_len": 100})
        if tapped:
            install_tap(env, RunnerRecorder(Phase.TRAIN, 0, mapping_of=lambda e: {}), 0)
        env.reset()
        actions = {0: 0, 1: 0}
        start = time.perf_counter()
        for i in range(steps):
            if env.step(actions)[2]["__all__"]:
                env.reset()
        return (time.perf_counter() - start) / steps

    plain = statistics.median(run(False) for _ in range(3))
    tapped = statistics.median(run(True) for _ in range(3))
    return plain, tapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    out = tempfile.mkdtemp(prefix="reward_audit_bench_")
    audited, plain = build(True, out), build(False, out)
    for algo, flag in ((audited, True), (plain, False)):  # warm-up
        one_round(algo, args.steps, flag)
    spent = _time_batch_capture()
    with_cb, without_cb = [], []
    for _ in range(args.rounds):
        with_cb.append(one_round(audited, args.steps, True))
        without_cb.append(one_round(plain, args.steps, False))
    a, b = statistics.median(with_cb), statistics.median(without_cb)
    paired = statistics.median(x / y for x, y in zip(with_cb, without_cb))
    print(f"env steps/s with callback:    {a:9.0f}  (median of {args.rounds} rounds of {args.steps} steps)")
    print(f"env steps/s without callback: {b:9.0f}")
    print(f"throughput ratio with/without: {a / b:.3f}  (overhead {100 * (1 - a / b):+.1f}%); median of the paired rounds' ratios {paired:.3f}")
    audited_seconds = sum(args.steps / x for x in with_cb)
    print(
        f"training-batch capture (phase `learning`): {spent[0]:.3f} s in {spent[1]} sample() calls, "
        f"{100 * spent[0] / audited_seconds:.2f}% of the audited rounds' time"
    )
    step_plain, step_tapped = bare_tap_cost()
    print(f"bare env step: {step_plain * 1e6:.1f} us plain, {step_tapped * 1e6:.1f} us tapped (+{(step_tapped - step_plain) * 1e6:.1f} us per step, no RLlib)")
    audited.stop()
    plain.stop()
    ray.shutdown()


if __name__ == "__main__":
    main()
