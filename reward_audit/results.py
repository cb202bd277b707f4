"""Dashboard numbers from a ``train()`` result: which flattened keys an adapter records, and
reading them back from Tune's ``result.json`` when a trial dir holds one. Pure; no Ray.

A path pattern ending in ``/`` takes the key after it (``env_runners/module_episode_returns_mean/``
-> one row per module); any other pattern is matched exactly. ``evaluation/...`` keys are the
evaluation phase.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

from .schema import Kind

Path = tuple[str, str, str]  # (pattern, kind, semantics)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``, as Tune flattens results for TensorBoard."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def match(result: dict, iteration: int, paths: Iterable[Path]) -> list[dict]:
    """Rows of the ``reported_iterations`` table for one (nested) result."""
    paths = [(p, k.value if isinstance(k, Kind) else k, s) for p, k, s in paths]
    rows = []
    for path, value in flatten(result).items():
        phase, inner = ("evaluation", path[len("evaluation/"):]) if path.startswith("evaluation/") else ("train", path)
        for pattern, kind, semantics in paths:
            if pattern.endswith("/"):
                if not inner.startswith(pattern) or "/" in inner[len(pattern):]:
                    continue
                key = inner[len(pattern):]
            elif inner == pattern:
                key = None
            else:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            rows.append({"phase": phase, "iteration": iteration, "path": path, "kind": kind, "key": key, "value": number, "semantics": semantics})
            break
    return rows


def manifest_paths(manifest: dict) -> list[Path]:
    """The adapter's recorded path patterns (``iteration_paths``; older runs: inferred from
    ``iteration_semantics`` by the key names RLlib uses)."""
    if manifest.get("iteration_paths"):
        return [tuple(p) for p in manifest["iteration_paths"]]
    out = []
    for pattern, semantics in (manifest.get("iteration_semantics") or {}).items():
        kind = Kind.EPISODE.value
        if pattern.endswith("/"):
            kind = Kind.MODULE.value if "module" in pattern else Kind.AGENT.value if "agent" in pattern else Kind.POLICY.value
        out.append((pattern, kind, semantics))
    return out


def tune_result_file(audit_dir: str) -> str | None:
    """``<trial dir>/result.json`` next to the audit folder, if Tune wrote one."""
    path = os.path.join(os.path.dirname(audit_dir.rstrip("/")), "result.json")
    return path if os.path.isfile(path) else None


def read_tune_results(file: str, paths: Iterable[Path]) -> list[dict]:
    """The dashboard rows of every iteration in a Tune ``result.json`` (one JSON per line)."""
    rows: list[dict] = []
    paths = list(paths)
    with open(file) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: Tune appends as it goes
            if "training_iteration" in result:
                rows += match(result, int(result["training_iteration"]), paths)
    return rows


def same_number(a: float, b: float, rtol: float = 1e-9) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=rtol)
