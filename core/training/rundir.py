"""The run directory (``arbor train --out``): what arbor may write into, and one process at a time.

A run directory is arbor's own: it holds ``train_config.json`` (written first, before any data is
read), ``metrics.jsonl``, ``training.png``, ``checkpoints/`` and the lock file. arbor never trains
into a directory that holds anything else, so it never truncates, replaces or rotates a file it did
not write; and a second process that tries to train in a directory in use is refused before it
touches anything (a save starts by removing the half-written checkpoints a killed save left, and
those would be the first process's).

The lock is an advisory ``flock`` on ``RUN/.arbor.lock`` where the platform has one: the kernel
releases it when its process dies, however it dies, so a lock left by a killed run is never in the
way. The file also records the pid and host of its holder, for the message, and for platforms
without ``flock``, where a lock whose pid no longer runs on this host is taken over.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pid check below is all there is
    fcntl = None

CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOCK = ".arbor.lock"
#: Everything arbor writes at the top of a run directory; anything else there is the user's.
RUN_FILES = frozenset({CONFIG, METRICS, CHECKPOINTS, LOCK, "training.png"})


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked (one-line message naming the path)."""


def check_out(out: str) -> Path:
    """``--out`` as a path, refused in one line when it cannot be a run directory."""
    if not out or not out.strip():
        raise RunDirectoryError("--out '' is empty; give the run directory, e.g. --out runs/my-run")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"--out {out}: is a file, not a directory; choose another --out")
    for parent in path.absolute().parents:  # `--out notes.txt/run` cannot be created
        if parent.exists():
            if not parent.is_dir():
                raise RunDirectoryError(f"--out {out}: {parent} is a file, so the directory cannot be created")
            break
    checkpoints = path / CHECKPOINTS
    if checkpoints.exists() and not checkpoints.is_dir():
        raise RunDirectoryError(f"--out {out}: {checkpoints} is a file, not arbor's checkpoint folder; move it "
                                "away or choose another --out")
    return path


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds an arbor run (its ``train_config.json``)."""
    return (path / CONFIG).is_file()


def foreign_files(path: Path) -> list[str]:
    """Names at the top of ``path`` that arbor does not write there (sorted). Hidden names (``.git``,
    ``.DS_Store``, arbor's own temporary files) are left out: arbor neither reads nor replaces them."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))


def check_own(path: Path) -> None:
    """Refuse a directory that holds files arbor did not write, or arbor's file names without a run."""
    other = foreign_files(path)
    if other:
        more = f" and {len(other) - 1} more" if len(other) > 1 else ""
        raise RunDirectoryError(f"--out {path}: holds files arbor did not write ({other[0]!r}{more}); arbor trains "
                                "only in a new or empty directory or in its own run's; choose another --out")
    if not holds_run(path) and (path / METRICS).exists():
        raise RunDirectoryError(f"--out {path}: holds a {METRICS} but no {CONFIG}, so it is not an arbor run and "
                                "arbor will not replace it; choose another --out")


def write_config(path: Path, settings: dict) -> None:
    """``train_config.json``, atomically: a run killed while writing it leaves none, never half of one."""
    target = path / CONFIG
    tmp = target.with_name(f".{CONFIG}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    tmp.replace(target)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


class RunLock:
    """One process per run directory: `acquire` it before reading or writing anything in the run.

    Released by `release`, and by the kernel when the process ends, however it ends.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = self.path / LOCK
        self._handle = None
        self._created: list[Path] = []  # directories `acquire` made, innermost first
        self._new_file = False  # whether `acquire` made the lock file

    def holder(self) -> str:
        """Who holds the lock, as the lock file says (for messages)."""
        try:
            info = json.loads(self.file.read_text(encoding="utf-8"))
            return f"process {info['pid']} on {info['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def acquire(self) -> RunLock:
        missing = [self.path, *self.path.parents]
        self._created = [p for p in missing[:next(i for i, p in enumerate(missing) if p.exists())]]
        self._new_file = not self.file.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.file, "a+", encoding="utf-8")  # noqa: SIM115 - held open while the run lasts
        except PermissionError:
            raise RunDirectoryError(f"--out {self.path}: cannot write there (permission denied); choose another "
                                    "--out") from None
        except OSError as exc:
            raise RunDirectoryError(f"--out {self.path}: cannot be used: {exc.strerror or exc}") from None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise RunDirectoryError(f"--out {self.path}: is in use by {self.holder()} (a run training there); "
                                        "wait for it to end, or choose another --out") from None
        else:  # pragma: no cover - no flock: trust the recorded pid when it is this host's and still runs
            try:
                info = json.loads(self.file.read_text(encoding="utf-8") or "{}")
            except ValueError:
                info = {}
            if info.get("host") == socket.gethostname() and info.get("pid") not in (None, os.getpid()) \
                    and _alive(int(info["pid"])):
                handle.close()
                raise RunDirectoryError(f"--out {self.path}: is in use by {self.holder()}; wait for it to end, "
                                        "or choose another --out")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Let the directory go. A lock file (and directories) this lock created, where nothing else
        was written (a command refused after taking the lock), is removed again: a refusal leaves no trace."""
        if self._handle is None:
            return
        if self._new_file and [p.name for p in self.path.iterdir()] == [LOCK]:
            self.file.unlink()
            for directory in self._created:
                try:
                    directory.rmdir()
                except OSError:  # something else appeared in it meanwhile: keep it
                    break
        if fcntl is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_checkpoint(checkpoint: Path, state: dict, run: Path, changeable) -> None:
    """Refuse a checkpoint this run did not write (copied in from another run, say).

    Its recorded step must be the one its name gives, and its settings the run's
    ``train_config.json``, except those in ``changeable`` (what a resume may change).
    """
    name = checkpoint.name
    try:
        named = int(name.split("-", 1)[1])
    except (IndexError, ValueError):
        raise RunDirectoryError(f"{checkpoint}: is not named step-NNNNNNNN; move it out of {run / CHECKPOINTS}") \
            from None
    if state.get("step") != named:
        raise RunDirectoryError(f"{checkpoint}: records step {state.get('step')!r} but is named for step {named}, so "
                                f"this run did not write it there; move it out of {run / CHECKPOINTS}")
    config_file = run / CONFIG
    if not config_file.is_file():
        return
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirectoryError(f"{config_file}: cannot be read ({exc}); it is the run's settings") from None
    trained = state.get("config") or {}
    if not isinstance(settings, dict) or not isinstance(trained, dict):
        raise RunDirectoryError(f"{config_file}: does not hold a table of settings")
    for key in sorted(set(settings) & set(trained)):
        if key not in changeable and settings[key] != trained[key]:
            raise RunDirectoryError(
                f"{checkpoint}: was trained with {key}={trained[key]!r}, but the run's {CONFIG} has "
                f"{key}={settings[key]!r}, so it belongs to another run; move it out of {run / CHECKPOINTS}")
