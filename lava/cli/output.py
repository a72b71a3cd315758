"""What the ``lava`` commands say and where they write: lava's own lines on stderr (results go to
stdout), notes once a model is loaded, and the check that an output folder can be written to
before any model loads."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import OutputError, describe_os_error


def note(message: str) -> None:
    """One line of lava's own output on stderr (results go to stdout)."""
    print(f"lava: {message}", file=sys.stderr)


def check_output_folder(out: Path, files: Sequence[Path] = ()) -> None:
    """Refuse, before any model is loaded, an output folder the results cannot be written to.

    ``out`` may be missing (it is created on the first write) but then its nearest existing
    parent must be a writable folder; ``files`` are the result paths inside it, none of which
    may be a folder. Raises ``OutputError`` in plain words.
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder: pass a folder (it is created if missing)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create the output folder {out}: {existing} is a file, not a folder")
    try:
        # A real write, not os.access: it also catches read-only mounts, ACLs and full disks.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        what = "write to the output folder" if existing == out else f"create the output folder {out} in"
        raise OutputError(f"cannot {what} {existing}: {describe_os_error(err)}") from None
    for path in files:
        if path.is_dir():
            raise OutputError(f"cannot write {path}: a folder of that name is in the way")


def note_loaded(backend, requested_resolution) -> None:
    """What the user should know once the model is loaded: a model without T5 (run without it, as
    with --drop-t5), a --resolution off the token grid."""
    if "no_t5" in backend.info:
        note(f"{backend.info['no_t5']}: running with the CLIP text encoders only, as with --drop-t5")
    note_resolution(backend, requested_resolution)


def note_resolution(backend, requested) -> None:
    """Say once when ``--resolution`` is not on the model's token grid, so the rounding is no surprise."""
    if isinstance(requested, int) and requested % backend.grid_unit:
        unit = backend.grid_unit
        side = max(unit, round(requested / unit) * unit)
        note(
            f"--resolution {requested} is not a multiple of {backend.name}'s token size ({unit} px); "
            f"image sides are rounded to multiples of {unit} (a {requested} px long side becomes {side} px)"
        )
