"""Atomic output: single files, and whole result folders swapped in as a unit.

Every file is written to a temporary name, then renamed. A command's result
folder (``--out``) is built whole in a temporary sibling folder and swapped in
at the end (:func:`output_folder`): a run that fails, is interrupted or is
killed leaves the previous result (or none) in place, never a mix.

The output-folder rule (:func:`check_out_dir`): ``--out`` must be new, empty, or
an earlier result of the *same* command (its ``config.json`` names the command),
which is replaced only with ``--overwrite``; a folder holding anything else, a
model folder, or a folder inside one is refused. While a run works on ``OUT``
it holds ``.OUT.layerif-lock`` beside it (an advisory ``flock`` plus the holder's
pid and host), so a second run on the same folder fails at once with a clear
message; the lock goes when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path
from typing import Any

from . import progress
from .errors import UserError

CACHE_DIR = ".layerif-cache"  # the one entry of a staging folder that survives an interrupted run (resume)


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create the output folder (and parents); a path that is a file is a user error."""
    path = Path(out)
    _check_no_file_on_path(path, "--out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {path}: {exc.strerror}") from None
    return path


def check_regular_file(path: str | os.PathLike, what: str) -> None:
    """A :class:`UserError` unless ``path`` is a regular file (or a link to one): a named pipe, socket or
    device would block the read forever or never end. A missing path is left to the reader."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise UserError(f"{what} {path} is not a regular file (a pipe, socket or device); give a file")


# ----------------------------------------------------------------------------- result folders

MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
               "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model folder: Hugging Face weight, adapter or tokenizer files, or a
    ``config.json`` of a model (``model_type`` / ``architectures``)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if any((path / f).exists() for f in MODEL_FILES):
        return True
    config = _read_json(path / "config.json")
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def result_command(path: str | os.PathLike) -> str | None:
    """The command whose result ``path`` holds (``config.json``'s ``command``), or None."""
    doc = _read_json(Path(path) / "config.json")
    command = doc.get("command") if isinstance(doc, dict) else None
    return command if isinstance(command, str) else None


def _check_no_file_on_path(path: Path, option: str) -> None:
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise UserError(f"{option} {path} is a file, not a folder" if p == path
                            else f"{option} {path}: {p} is a file, not a folder")


def check_not_model_folder(path: str | os.PathLike, option: str, own: bool = False) -> None:
    """Raise a :class:`UserError` when ``path`` is a model folder (unless ``own``: an earlier result of the
    command itself, e.g. a pruned model) or lies inside one."""
    path = Path(path)
    for p in (path, *path.parents):
        if is_model_folder(p) and not (own and p == path):
            where = "is a model folder" if p == path else f"is inside the model folder {p}"
            raise UserError(f"{option} {path} {where}; layerif never writes into a model folder")


def check_place(path: str | os.PathLike, option: str, own: bool = False) -> None:
    """Where a folder replaced as a whole may go: not under a file, not the current folder or one holding it,
    not a model folder (:func:`check_not_model_folder`, ``own`` as there) nor inside one. Changes nothing."""
    path = Path(path)
    _check_no_file_on_path(path, option)
    if path.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise UserError(f"{option} {path} is (or holds) the current folder; it is replaced as a whole, "
                        "so choose a folder below it")
    check_not_model_folder(path, option, own)


def check_out_dir(out: str | os.PathLike, command: str, overwrite: bool = False, option: str = "--out") -> Path:
    """Check an output folder against the output-folder rule (module docstring); changes nothing.

    Raises :class:`UserError` for a path under a file, a model folder or a folder
    inside one, a folder holding anything but an earlier ``command`` result, and
    an earlier ``command`` result without ``overwrite``.
    """
    path = Path(out)
    check_place(path, option)
    if not path.is_dir() or not any(path.iterdir()):
        return path
    earlier = result_command(path)
    if earlier is None:
        raise UserError(f"{option} {path} holds files that are not a layerif result; choose a new or empty folder")
    if earlier != command:
        raise UserError(f"{option} {path} holds a result of `layerif {earlier}`, not of `layerif {command}`; "
                        "choose another folder")
    if not overwrite:
        raise UserError(f"{option} {path} holds an earlier `layerif {command}` result; "
                        "pass --overwrite to replace it (it is kept until the new result is complete)")
    return path


def overwrite_field(option: str = "--out") -> Any:
    """The ``--overwrite`` option of a command writing ``option`` (command line only, never from ``--config``)."""
    return field(default=False, metadata={"help": f"replace an earlier result of this command in {option} (kept until "
                                                  "the new one is complete; command line only)", "from_config": False})


def sibling(dest: Path, kind: str) -> Path:
    """The hidden sibling ``.NAME.layerif-KIND`` of ``dest`` (kind: lock, partial, old, swap), ``dest`` resolved."""
    dest = Path(dest).resolve()
    if not dest.name:
        raise UserError(f"{dest} cannot be an output folder")
    return dest.with_name(f".{dest.name}.layerif-{kind}")


def _lock_holder(lock: Path) -> str:
    try:
        doc = json.loads(lock.read_text(encoding="utf-8"))
        return f"pid {doc['pid']} on {doc['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def folder_lock(dest: Path, option: str = "--out") -> Iterator[Path]:
    """Hold the lock file of ``dest`` (``flock``, non-blocking) for the ``with`` body.

    A second holder gets a :class:`UserError` naming the first one's pid and host.
    The lock file is removed on exit; a lock file left by a killed process holds
    no ``flock`` and is simply taken over.
    """
    lock = sibling(dest, "lock")
    fd: int | None = None
    try:
        with signals_deferred():  # a signal while the lock file is made is delivered once its removal is certain
            fd = _acquire(lock, dest, option)
        yield lock
    finally:
        if fd is not None:
            try:
                os.unlink(lock)
            finally:
                os.close(fd)


def _acquire(lock: Path, dest: Path, option: str) -> int:
    """Open, ``flock`` and stamp (pid, host) the lock file ``lock`` of ``dest``; returns its descriptor."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot create the lock file {lock}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{option} {dest} is in use by another layerif run ({_lock_holder(lock)}, lock file "
                            f"{lock}); wait for it to finish or choose another folder") from None
        try:  # the holder before us may have removed the file we locked: then lock the new one
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    return fd


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM arriving in the body are delivered after it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def _swap(staging: Path, dest: Path) -> None:
    """Put ``staging`` at ``dest``; the old ``dest`` waits aside until the new one is in place.

    Idempotent: a journal file marks a swap in progress, and re-running this
    after a crash at any point finishes the swap (:func:`_recover`).
    """
    old, journal = sibling(dest, "old"), sibling(dest, "swap")
    journal.touch()
    if staging.exists():
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)
    journal.unlink()


def _recover(dest: Path) -> None:
    """Finish a swap a killed run left half-done, or put back an old result left aside."""
    old = sibling(dest, "old")
    if sibling(dest, "swap").exists():
        progress.info(f"finishing the interrupted replacement of {dest}")
        _swap(sibling(dest, "partial"), dest)
    elif old.exists():
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, dest)


def _keep_only_cache(staging: Path) -> None:
    """Remove everything in ``staging`` but :data:`CACHE_DIR`."""
    for entry in staging.iterdir() if staging.exists() else ():
        if entry.name == CACHE_DIR:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextmanager
def staged_folder(dest: str | os.PathLike, option: str = "--out", check: Callable[[Path], Any] | None = None) -> Iterator[Path]:
    """Lock ``dest``, yield its staging folder ``.NAME.layerif-partial`` to fill, then swap it in.

    ``check(dest)`` runs once the lock is held (the folder may have changed since
    an earlier check). The staging folder keeps only :data:`CACHE_DIR` from an
    interrupted earlier run (resume); it is removed before the swap. On any
    failure (an error, Ctrl-C, SIGTERM) only its cache survives, for the next run
    to resume from: finished work is never deleted by a later error. A
    :class:`UserError` or :class:`FloatingPointError` that leaves a non-empty cache is re-raised with its
    message extended by where the finished work is kept and how to resume; a
    staging folder left empty is removed. ``dest`` is untouched until the swap,
    which Ctrl-C and SIGTERM do not interrupt.
    """
    dest = Path(dest).resolve()  # `--out .` is the current folder by its name
    _check_no_file_on_path(dest, option)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {dest.parent}: {exc.strerror}") from None
    staging = sibling(dest, "partial")
    with folder_lock(dest, option):
        _recover(dest)
        if check is not None:
            check(dest)
        staging.mkdir(exist_ok=True)
        _keep_only_cache(staging)
        try:
            yield staging
        except BaseException as exc:
            _keep_only_cache(staging)
            cache = staging / CACHE_DIR
            if cache.is_dir() and not any(cache.iterdir()):
                cache.rmdir()
            if staging.exists() and not any(staging.iterdir()):
                staging.rmdir()
            if isinstance(exc, (UserError, FloatingPointError)) and cache.is_dir():
                raise type(exc)(f"{exc}; finished work kept in {cache}: rerun with --resume "
                                "(and the same options) to continue from it") from exc
            raise
        shutil.rmtree(staging / CACHE_DIR, ignore_errors=True)
        with signals_deferred():
            _swap(staging, dest)


@contextmanager
def output_folder(out: str | os.PathLike, command: str, overwrite: bool = False) -> Iterator[Path]:
    """The ``--out`` of ``command``: :func:`staged_folder` with :func:`check_out_dir` once the lock is held
    (and an interrupted swap finished)."""
    with staged_folder(out, "--out", lambda d: check_out_dir(d, command, overwrite)) as tmp:
        yield tmp


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` to write a temporary file beside ``path``, then rename it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``dest`` whole.

    A failure inside the ``with`` leaves the old ``dest`` (or none) and removes
    the temporary folder. If another process put ``dest`` in place meanwhile, the
    newer of the two wins; nothing half-written is ever at ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, w)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend: the one place the backend is chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_axes(ax: Any, xlabel: str, ylabel: str, title: str | None = None) -> None:
    """The house style of a plot's axes: labels, an optional title, a light grid and a small legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_figure(path: str | os.PathLike, fig: Any) -> Path:
    """Save a matplotlib figure atomically (format from the file suffix) and close it."""
    import matplotlib.pyplot as plt

    suffix = Path(path).suffix.lstrip(".") or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def write_files(folder: str | os.PathLike, files: dict[str, Any]) -> list[Path]:
    """Write each ``name -> content`` into ``folder``: text (str), JSON (dict or list) or a matplotlib figure."""
    out = []
    for name, content in files.items():
        path = Path(folder) / name
        if isinstance(content, str):
            out.append(write_text(path, content))
        elif isinstance(content, (dict, list)):
            out.append(write_json(path, content))
        else:
            out.append(write_figure(path, content))
    return out
