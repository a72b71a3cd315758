"""Writing result files atomically: a failure leaves the old file or none, never half of one.

``atomic_files`` extends that to a set of files (one image's label map, overlay, classes...):
all of them appear, or none does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from PIL import Image

from .errors import OutputError, describe_os_error


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); results get the usual mode a new file would get.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def _output_error(path: Path, err: OSError) -> OutputError:
    """``err`` reworded about the result ``path`` (never the temporary name it was written to)."""
    if isinstance(err, OutputError):
        return err
    if err.errno is None:
        return OutputError(f"cannot write {path}: {err}")
    return OutputError(f"cannot write {path}: {describe_os_error(err)}")


def _result_for(err: OSError, tmps: Sequence[Path], paths: Sequence[Path]) -> Path:
    """The result path whose temporary ``err`` is about (the only one, or the first, if unknown)."""
    for tmp, path in zip(tmps, paths):
        if err.filename is not None and os.fspath(err.filename) == os.fspath(tmp):
            return path
    return paths[0]


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then deliver it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple] = []
    previous = signal.signal(signal.SIGINT, lambda *a: received.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(*received[0])
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Yield one temporary path beside each of ``paths``; when the block succeeds, all are renamed
    into place together (an interrupt is held back until the renames are done), else all are
    removed. A failure of any rename removes the files already moved, so a set is whole or absent.

    Errors writing or moving come out as ``OutputError`` naming the result path.
    """
    paths = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for path in paths:
            try:
                tmps.append(_temp_beside(path))
            except OSError as err:
                raise _output_error(path, err) from err
        try:
            yield list(tmps)
        except OSError as err:
            raise _output_error(_result_for(err, tmps, paths), err) from err
        moved: list[Path] = []
        with _interrupts_deferred():
            for tmp, path in zip(tmps, paths):
                try:
                    os.replace(tmp, path)
                except OSError as err:
                    for done in moved:
                        done.unlink(missing_ok=True)
                    raise _output_error(path, err) from err
                moved.append(path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    with atomic_files([path]) as (tmp,):
        yield tmp


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` and move the result onto ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
