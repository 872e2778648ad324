"""Output-directory I/O: atomic Parquet/JSON/text writes on local paths or pyarrow-filesystem URIs.

Every write goes to a temporary name in the same directory and is renamed
into place (local) or uploaded whole (object stores, where a PUT is atomic),
so an interrupted stage never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# The only names an interrupted write may leave behind (all hidden, all next to their target):
# ``.<file>.<tag>.tmp`` (write_bytes), ``.<dir>.tmp-<tag>`` (staging_dir),
# ``.<dir>.old-<tag>`` (replace_dir) and ``.<dir>-ray`` (Ray Train checkpoints a rerun
# resumes from; removed once the model is published). ``<tag>`` is ``<host>_<pid>_<random>``
# (``OWNER_TAG``): the writer, so a clean-up never removes a live process's temp.
TEMP_NAME = re.compile(
    r"^\.(?P<target>.+?)"
    r"(\.(?P<tmp>[a-z0-9_]+)\.tmp|\.tmp-(?P<stage>[a-z0-9_]+)|\.old-(?P<old>[a-z0-9_]+)|-ray)$"
)
OWNER_TAG = re.compile(r"^(?P<host>[0-9a-f]{8})_(?P<pid>[0-9]+)_[a-z0-9_]+$")
# A temp whose writer cannot be checked (another host, or a name without an owner) is only
# removed once it is this old: no live write keeps a temp name for an hour.
UNKNOWN_OWNER_STALE_S = 3600.0


def host_tag() -> str:
    """This machine in temp names: 8 hex digits of its host name."""
    return hashlib.blake2s(socket.gethostname().encode(), digest_size=4).hexdigest()


def owner_prefix() -> str:
    """``<host>_<pid>_``, the start of this process's temp tags."""
    return f"{host_tag()}_{os.getpid()}_"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def temp_is_stale(path: Path, tag: str) -> bool:
    """Whether a temp may be removed: its writer (named in ``tag``) no longer runs on this
    machine; a writer on another machine, or a tag without a writer, counts as gone once the
    temp has not changed for ``UNKNOWN_OWNER_STALE_S``."""
    m = OWNER_TAG.match(tag)
    if m and m.group("host") == host_tag():
        return not pid_alive(int(m.group("pid")))
    try:
        age = time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age >= UNKNOWN_OWNER_STALE_S


def remove_stale_temps(target: str | Path) -> list[str]:
    """Delete what an interrupted earlier write of ``target`` left next to it (temp files and
    staging / replaced directories; never the ``-ray`` checkpoints, which a rerun resumes
    from). Called before each new write, so a rerun after a kill ends with a clean directory.
    Only stale temps go (``temp_is_stale``): a temp of a process that is still writing (another
    thread's, a Ray worker's, another driver's) is left alone. Returns the removed paths."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for p in target.parent.iterdir():
        m = TEMP_NAME.match(p.name)
        if not m or m.group("target") != target.name or p.name.endswith("-ray"):
            continue
        tag = m.group("tmp") or m.group("stage") or m.group("old")
        if not temp_is_stale(p, tag):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(str(p))
    return removed


class CorruptFileError(ValueError):
    """A result file that cannot be read or lacks required columns."""


def is_uri(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    return (
        pafs.FileSystem.from_uri(path)
        if is_uri(path)
        else (pafs.LocalFileSystem(), str(Path(path).absolute()))
    )


def exists(path: str) -> bool:
    fs, p = _fs(str(path))
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = _fs(str(path))
    fs.create_dir(p, recursive=True)


def write_bytes(path: str, data: bytes) -> None:
    """Atomic: temp file + rename locally; a single whole-object upload on object stores."""
    path = str(path)
    if is_uri(path):
        fs, p = _fs(path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.{owner_prefix()}", suffix=".tmp", dir=target.parent
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_bytes(path: str) -> bytes:
    fs, p = _fs(str(path))
    with fs.open_input_stream(p) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_parquet(path: str, table: pa.Table | Any) -> None:
    """Write a pyarrow Table (or pandas DataFrame / list of dicts) atomically."""
    if not isinstance(table, pa.Table):
        if isinstance(table, list):
            table = pa.Table.from_pylist(table)
        else:
            table = pa.Table.from_pandas(table, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(path, buf.getvalue())


# Output-layout folder (DESIGN 7) -> the job that writes files there.
_WRITERS = {
    "data": "rayjobs.data",
    "models": "rayjobs.train",
    "harvest": "rayjobs.harvest",
    "coverage": "rayjobs.coverage",
    "eval": "rayjobs.evaluate",
    "tune": "rayjobs.tune",
}


def producing_stage(path: str) -> str:
    """The job that writes ``path`` in the output layout, so an error can say what to rerun."""
    parts = str(path).replace("\\", "/").split("/")
    if parts and parts[-1] in ("eval_summary.parquet", "eval_gaps.parquet"):
        return "rayjobs.evaluate"
    for part in reversed(parts[:-1]):
        if part in _WRITERS:
            return _WRITERS[part]
    return "the stage that writes it"


def read_parquet(path: str, required: list[str] | None = None) -> pa.Table:
    """Read a Parquet file; a missing, corrupt or schema-mismatched file gets a clear error.

    The message names the file and the job to rerun, so a user never has to read a pyarrow
    traceback to find out which stage's output is broken.
    """
    path = str(path)
    stage = producing_stage(path)
    if not exists(path):
        raise FileNotFoundError(
            f"{path} does not exist; run {stage} first "
            "(or the whole pipeline: python -m rayjobs.pipeline)"
        )
    try:
        fs, p = _fs(path)
        table = pq.read_table(p, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorruptFileError(
            f"{path} is not a readable Parquet file ({e}); delete it and rerun {stage}"
        ) from e
    missing = [c for c in (required or []) if c not in table.column_names]
    if missing:
        raise CorruptFileError(
            f"{path} lacks columns {missing} (has {table.column_names}); it was written by another "
            f"version or stage: delete it and rerun {stage}"
        )
    return table


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Move a fully written local directory into place, replacing any old one in one rename."""
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{owner_prefix()}{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp_dir, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(final_dir: str) -> str:
    """A fresh sibling directory to write into before ``replace_dir``."""
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    return tempfile.mkdtemp(prefix=f".{final.name}.tmp-{owner_prefix()}", dir=final.parent)


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local directory to ``dest`` (local path: atomic replace; URI: file by file)."""
    if not is_uri(dest):
        tmp = staging_dir(dest)
        shutil.rmtree(tmp)
        shutil.copytree(local_dir, tmp)
        replace_dir(tmp, dest)
        return
    fs, p = _fs(dest)
    pafs.copy_files(local_dir, p, destination_filesystem=fs)
