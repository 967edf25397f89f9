"""Files in and out for every package (models and lowrank use this module, neither reaches into the other):
atomic writes of one file or of several files of one folder, names checked before they become paths.

One file: written to a temporary file beside it, fsynced, then renamed over it (os.replace), so a reader sees
the old file or the new one. Several files of one folder (a checkpoint's config.json and model.safetensors,
an adapter's two files): every temporary file is written and fsynced first, then a journal naming them is
written (atomically: the commit point), then the renames, then the journal goes. A crash before the journal
leaves the old files; a crash after it leaves a journal that `finish_interrupted_write` (every loader calls
it) carries out, so a folder never loads as new weights beside an old config. Temporary files left by a
killed process are removed by the next write into their folder.
"""
import json
import os
import re
import uuid
from pathlib import Path
from typing import Callable

from .errors import CheckpointError

JOURNAL_NAME = ".lowrank-commit.json"
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def checked_name(name, what: str) -> str:
    """`name` if it can be one path component inside a folder: a non-empty str of letters, digits, '_' and
    '-' (no '.', no separators, so never '..', absolute or hidden); else ValueError naming `what`."""
    if not isinstance(name, str) or not re.fullmatch(r"[\w-]+", name):
        raise ValueError(f"{what} {name!r} must be a non-empty string of letters, digits, '_' and '-' (it names "
                         f"a module key and a folder, so no '.', '/' or '\\\\')")
    return name


def inside(folder: Path, name: str, what: str) -> Path:
    """folder / name, where `name` (from a file, e.g. a shard index) must be a plain file name in `folder`:
    CheckpointError naming `what` for an absolute path, a separator or '..'."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise CheckpointError(f"{what}: {name!r} is not a file name inside {folder}")
    return folder / name


def read_json_object(file: Path) -> dict:
    """The JSON object in `file`; CheckpointError naming the file when it is not UTF-8, not JSON or not an
    object (a list, a number)."""
    try:
        value = json.loads(Path(file).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: not a valid UTF-8 JSON file ({str(e)[:200] or 'nested too deeply'})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_for(file: Path) -> Path:
    return file.with_name(f".{file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _written(file: Path, write: Callable[[Path], None]) -> Path:
    """A fsynced temporary file beside `file` holding what write(tmp) wrote; removed if write fails."""
    tmp = _temp_for(file)
    try:
        write(tmp)
        _fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(file: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) for a temporary file in file's folder, then rename it over file."""
    file = Path(file)
    remove_orphans(file.parent)
    os.replace(_written(file, write), file)


def write_folder(folder, writers: dict) -> None:
    """Write several files of `folder` as one change: writers is {file name: write(tmp_path)}. Other files
    in the folder are left as they are."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    finish_interrupted_write(folder)
    temps = {}
    try:
        for name, write in writers.items():
            temps[name] = _written(inside(folder, name, "write_folder"), write).name
        text = json.dumps(temps)
        atomic_write(folder / JOURNAL_NAME, lambda tmp: Path(tmp).write_text(text))
    except BaseException:
        for tmp in temps.values():
            (folder / tmp).unlink(missing_ok=True)
        raise
    _carry_out(folder, temps)


def _carry_out(folder: Path, renames: dict) -> None:
    for name, tmp in renames.items():
        try:
            os.replace(folder / tmp, folder / name)
        except FileNotFoundError:  # renamed already, by an earlier run of this journal
            pass
    _fsync(folder)
    (folder / JOURNAL_NAME).unlink(missing_ok=True)


def finish_interrupted_write(folder) -> None:
    """Complete a write_folder that a crash interrupted after its commit point (the journal), and remove
    temporary files of processes that are gone. Does nothing to a folder without them."""
    folder = Path(folder)
    journal = folder / JOURNAL_NAME
    if journal.is_file():
        try:
            renames = json.loads(journal.read_text())
            if not isinstance(renames, dict):
                raise ValueError("not a JSON object")
            renames = {inside(folder, n, str(journal)).name: inside(folder, t, str(journal)).name
                       for n, t in renames.items()}
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{journal}: an interrupted save's journal that cannot be read ({e}); remove "
                                  f"it to keep the files as they are") from None
        try:
            _carry_out(folder, renames)
        except OSError as e:
            raise CheckpointError(f"{journal}: a save into {folder} was interrupted and cannot be finished: "
                                  f"{e}") from None
    remove_orphans(folder)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_orphans(folder: Path) -> None:
    """Delete `.<name>.<pid>.<hex>.tmp` files in folder whose process has exited (a killed write's leftovers),
    unless a journal still names them."""
    if not folder.is_dir():
        return
    journal = folder / JOURNAL_NAME
    pending = set()
    if journal.is_file():
        try:
            pending = set(json.loads(journal.read_text()).values())
        except (ValueError, AttributeError, UnicodeDecodeError):
            return  # finish_interrupted_write reports it
    for entry in folder.iterdir():
        match = _TEMP.fullmatch(entry.name)
        if match and entry.name not in pending and not _process_alive(int(match["pid"])):
            entry.unlink(missing_ok=True)
