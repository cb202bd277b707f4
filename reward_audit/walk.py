"""Finding runs: which folders below a path are audited (``find_runs``), and resolving a
path or URI to a ``pyarrow.fs`` file system. The rules (depth, links, what is skipped) are
stated in docs/run_folders.md.
"""

from __future__ import annotations

import logging
import os

import pyarrow.fs as pafs

from . import schema
from .errors import RunNotFoundError

logger = logging.getLogger("reward_audit")


def resolve_filesystem(path_or_uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or any ``pyarrow.fs`` URI."""
    if "://" in str(path_or_uri):
        return pafs.FileSystem.from_uri(str(path_or_uri))
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(str(path_or_uri)))


# --------------------------------------------------------------------------- finding runs

MAX_DEPTH = 4  # audit folders are found up to this many levels below the given folder


def _is_audit_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(f"{path}/{schema.MANIFEST_NAME}").type == pafs.FileType.File


def _shown(path: str) -> str:
    """A path as text, also when a name is not UTF-8 (its bytes shown as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    """Whether a name from ``os.scandir`` is valid UTF-8 (pyarrow opens no other)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _inside(folder: str, path: str) -> bool:
    """Whether the real location of ``path`` is ``folder`` (a real path) or below it."""
    return os.path.commonpath([folder, os.path.realpath(path)]) == folder


def find_runs(path_or_uri: str, max_depth: int = MAX_DEPTH) -> list[str]:
    """Audit folders at, inside, or below ``path_or_uri`` (audit dir, trial dir, experiment
    dir), at most ``max_depth`` levels below it. Local folders are walked without following
    links (see docs/run_folders.md); what cannot be listed is skipped with one warning
    line each (logger ``reward_audit``); the same real folder is found once."""
    fs, path = resolve_filesystem(path_or_uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    if local and not _is_utf8(path):
        raise RunNotFoundError(f"{_shown(path)}: the path is not valid UTF-8, which pyarrow cannot open; rename the folder, then pass it again")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise RunNotFoundError(
            f"{path_or_uri}: no such folder; pass the run's trial dir or its `reward_audit/` folder"
        )
    if info.type != pafs.FileType.Directory:
        raise RunNotFoundError(
            f"{path_or_uri}: is a file, not a folder; pass the folder that holds `{schema.MANIFEST_NAME}`"
        )
    if _is_audit_dir(fs, path):
        return [path]
    found, skipped = _walk_local(path, max_depth) if local else (_walk_remote(fs, path, max_depth), 0)
    if not found:
        also = f" ({skipped} folders skipped, see the warnings above)" if skipped else ""
        raise RunNotFoundError(
            f"{path_or_uri}: no reward_audit data here (no `{schema.AUDIT_DIR_NAME}/{schema.MANIFEST_NAME}` "
            f"up to {max_depth} levels below){also}; record a run with `config.callbacks(RewardAuditCallback)` "
            "first, then pass its trial dir"
        )
    return sorted(found)


def _walk_local(root: str, max_depth: int) -> tuple[list[str], int]:
    """Breadth-first ``os.scandir`` walk of a local folder: ``(audit folders, skipped)``.

    Links below ``root`` are never followed: a link into ``root`` leads nowhere new (its
    target is walked directly), a link out of it is reported. Every real folder is listed
    once (by ``(st_dev, st_ino)``), so bind-mount loops end too. A folder that cannot be
    listed or named (permission, name too long, not UTF-8) is skipped with a warning.
    """
    real_root = os.path.realpath(root)
    seen = {_identity(os.stat(root))}
    found: list[str] = []
    skipped = 0

    def skip(path: str, reason: str) -> None:
        nonlocal skipped
        skipped += 1
        logger.warning("warning: %s: skipped (%s)", _shown(path), reason)

    level = [root]
    for depth in range(1, max_depth + 1):
        below = []
        for folder in level:
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except OSError as e:
                skip(folder, e.strerror or type(e).__name__)
                continue
            for entry in entries:
                try:
                    if not entry.is_dir():  # files, and links to files or to nothing
                        continue
                    if entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if not _inside(real_root, target):
                            skip(entry.path, f"a link to {_shown(target)}, outside {_shown(root)}; links are not followed, pass `{_shown(target)}` to audit it")
                        continue
                    if not _is_utf8(entry.name):
                        skip(entry.path, "the name is not valid UTF-8; rename the folder to audit what it holds")
                        continue
                    identity = _identity(entry.stat(follow_symlinks=False))
                except OSError as e:
                    skip(entry.path, e.strerror or type(e).__name__)
                    continue
                if identity in seen:
                    continue
                seen.add(identity)
                if entry.name == schema.AUDIT_DIR_NAME and os.path.isfile(os.path.join(entry.path, schema.MANIFEST_NAME)):
                    found.append(entry.path)
                elif depth < max_depth:
                    below.append(entry.path)
        level = below
    return found, skipped


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _walk_remote(fs: pafs.FileSystem, path: str, max_depth: int) -> list[str]:
    """Object stores (``s3://`` ...) have no links: one recursive listing."""
    found = []
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    for entry in fs.get_file_info(selector):
        rel_depth = entry.path[len(path):].count("/")
        if (
            entry.type == pafs.FileType.File
            and entry.base_name == schema.MANIFEST_NAME
            and rel_depth <= max_depth + 1
            and entry.path.rsplit("/", 2)[-2] == schema.AUDIT_DIR_NAME
        ):
            found.append(entry.path.rsplit("/", 1)[0])
    return found


