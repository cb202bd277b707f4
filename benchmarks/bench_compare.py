"""``compare`` against a bare scan of the same files, measured side by side in one run.

For each size, generates a synthetic run in the exact store format
(``reward_audit.synthetic``: Ray 2.60 new-stack manifest, 8 remote runners, 8 agents on 4
modules, 1–3 chunks per episode, one part per iteration per phase per table), then
alternates, each in a fresh subprocess (so peak RSS is its own):

* **bare**: ``pyarrow.dataset`` scan of the raw parts + group-by (phase, runner, episode,
  agent) summing the rewards — the least any audit must do;
* **compare**: ``reward_audit.compare(run)`` — every verdict, the dashboard rebuild.

and prints rows → seconds, ratio, peak RSS, bytes per raw row on disk, part files.

    python benchmarks/bench_compare.py                       # 10k, 100k, 1M rows
    python benchmarks/bench_compare.py --rows 10000000 --repeat 2 --inject leak
    python benchmarks/bench_compare.py --rows 1000000 --batches   # with the learning phase
    python benchmarks/bench_compare.py --rows 64000000 --iterations 1000 --repeat 1
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BARE = """
import sys, pyarrow.dataset as ds
t = ds.dataset(sys.argv[1] + "/raw_rewards", format="parquet").to_table(columns=["phase", "runner_id", "episode_id", "agent_id", "reward", "pre_obs_reward"])
t.group_by(["phase", "runner_id", "episode_id", "agent_id"]).aggregate([("reward", "sum"), ("pre_obs_reward", "sum")])
"""
COMPARE = """
import sys, reward_audit
a = reward_audit.compare(sys.argv[1])
print(a.counts(), a.stats["windows"], file=sys.stderr)
"""
REPORT = """
import sys, reward_audit.report as r, reward_audit
r.render_html(reward_audit.compare(sys.argv[1]))
"""


def timed(code: str, path: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``python -c code path`` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, path], stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()  # small; read before reaping so the child never blocks on a full pipe
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed (exit {proc.returncode}):\n{err}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000, 1_000_000], help="raw agent-chunk rows (approx.)")
    ap.add_argument("--iterations", type=int, default=0, help="iterations (default: rows / 100k, at least 10)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds per size; the median is shown")
    ap.add_argument("--inject", choices=["leak", "drop"], default=None)
    ap.add_argument("--batches", action="store_true", help="also record training batches (batch_rewards): compare audits phase `learning` too")
    ap.add_argument("--report", action="store_true", help="also time `report` (HTML) against compare")
    ap.add_argument("--keep", default=None, help="generate into (and keep) this folder")
    args = ap.parse_args()
    from reward_audit.synthetic import generate_run

    print(f"{'rows':>11} {'compare s':>10} {'bare s':>8} {'ratio':>6} {'RSS compare':>12} {'RSS bare':>9} {'bytes/row':>9} {'parts':>6}" + ("  report s  report/compare" if args.report else ""))
    for rows in args.rows:
        iterations = args.iterations or max(10, rows // 100_000)
        per_iteration = max(8, round(rows / iterations / 16))  # 8 agents x 2 chunks on average
        base = args.keep or tempfile.mkdtemp(prefix="bench_compare_")
        folder = os.path.join(base, f"run{rows}")
        if not os.path.exists(os.path.join(folder, "reward_audit", "run.json")):
            generate_run(folder, iterations=iterations, episodes_per_iteration=per_iteration, inject=args.inject, batches=args.batches)
        audit_dir = os.path.join(folder, "reward_audit")
        raw_files = glob.glob(f"{audit_dir}/raw_rewards/*.parquet")
        import pyarrow.parquet as pq

        n = sum(pq.ParquetFile(f).metadata.num_rows for f in raw_files)
        size = sum(os.path.getsize(f) for f in raw_files)
        parts = len(glob.glob(f"{audit_dir}/*/*.parquet"))
        c_times, b_times, c_rss, b_rss, r_times = [], [], [], [], []
        for _ in range(args.repeat):
            w, m = timed(BARE, audit_dir)
            b_times.append(w)
            b_rss.append(m)
            w, m = timed(COMPARE, audit_dir)
            c_times.append(w)
            c_rss.append(m)
            if args.report:
                r_times.append(timed(REPORT, audit_dir)[0])
        c, b = statistics.median(c_times), statistics.median(b_times)
        line = f"{n:>11,} {c:>10.2f} {b:>8.2f} {c / b:>6.2f} {max(c_rss):>9.0f} MB {max(b_rss):>6.0f} MB {size / n:>9.2f} {parts:>6}"
        if args.report:
            r = statistics.median(r_times)
            line += f"  {r:>8.2f}  {r / c:>14.2f}"
        print(line, flush=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"(median of {args.repeat} alternating rounds; each measurement a fresh process, interpreter start included; "
          f"peak RSS = max over rounds; {resource.getpagesize()}-byte pages)")


if __name__ == "__main__":
    main()
