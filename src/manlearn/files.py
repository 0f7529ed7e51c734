"""Writing the user's files: a failed write is one line naming the path (and, on a full disk, the space
needed and free), and never leaves a torn or half-written file behind.

- :func:`write_failure`: an ``OSError`` from a write as one :class:`~manlearn.errors.OutputError` line.
- :func:`no_space`: the ``ENOSPC`` error of a write of known size, with the space needed and free.
- :func:`replace_text` / :func:`write_text_atomic`: replace a file by new text, or leave the old one untouched.
- :func:`append_lines` / :func:`append_text`: append lines, or leave the file as it was (no torn last line).
- :func:`save_figure`: a matplotlib figure, the same way.
- :func:`torch_load_problem`: a failed ``torch.load`` in a few words.
The first of each pair raises the ``OSError`` (for callers that add what was kept), the second the line.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import OutputError

__all__ = ["write_failure", "no_space", "replace_text", "append_lines", "write_text_atomic", "append_text",
           "save_figure", "size_text", "os_error_text", "torch_load_problem"]


def size_text(n: float) -> str:
    """``n`` bytes for a person: KiB below one MiB, else MiB."""
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def _free(folder: Path) -> int | None:
    for p in (folder, *folder.parents):  # the folder may not exist yet
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def no_space(needed: float, folder: str | Path) -> OSError:
    """ENOSPC for a write of about ``needed`` bytes into ``folder``, saying what is free there."""
    free = _free(Path(folder))
    free_s = f", {size_text(free)} free" if free is not None else ""
    return OSError(errno.ENOSPC, f"No space left on device: about {size_text(needed)} needed{free_s}")


def os_error_text(e: OSError) -> str:
    """``No space left on device (ENOSPC)``: the error's text and its errno name."""
    name = errno.errorcode.get(e.errno or 0, "")
    text = f"{e.strerror or e}"
    return text + (f" ({name})" if name and name not in text else "")


def write_failure(path: str | Path, e: OSError, what: str = "write", tail: str = "") -> OutputError:
    """One line for a failed write: the path and the cause (``tail``: what was kept, e.g. the previous
    checkpoint)."""
    return OutputError(f"cannot {what} {path}: {os_error_text(e)}" + (f"; {tail}" if tail else ""))


def replace_text(path: str | Path, text: str | bytes) -> Path:
    """Replace ``path`` by ``text`` (or bytes) through a temporary file; on failure the old file stays, the
    temporary goes, and the ``OSError`` (on a full disk: with the space needed) propagates."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    data = text.encode() if isinstance(text, str) else text
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise _sized(e, len(data), path) from None
    return path


def append_lines(path: str | Path, text: str) -> None:
    """Append ``text`` (whole lines) to ``path`` and flush; a failed append is cut off again, so the file
    never ends in a torn line, and the ``OSError`` (on a full disk: with the space needed) propagates."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
            f.flush()
    except OSError as e:
        try:
            if size is None:
                path.unlink(missing_ok=True)
            else:
                os.truncate(path, size)
        except OSError:
            pass
        raise _sized(e, len(text.encode()), path) from None


def _sized(e: OSError, needed: int, path: Path) -> OSError:
    return no_space(needed, path.parent) if e.errno == errno.ENOSPC else e


def write_text_atomic(path: str | Path, text: str | bytes, what: str = "write") -> Path:
    """:func:`replace_text`, a failure as one :class:`OutputError` line."""
    try:
        return replace_text(path, text)
    except OSError as e:
        raise write_failure(path, e, what) from None


def append_text(path: str | Path, text: str, what: str = "write") -> None:
    """:func:`append_lines`, a failure as one :class:`OutputError` line."""
    try:
        append_lines(path, text)
    except OSError as e:
        raise write_failure(path, e, what) from None


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure written atomically (rendered in memory first, format from the suffix)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    formats = fig.canvas.get_supported_filetypes()
    if fmt not in formats:
        raise OutputError(f"cannot write a plot as .{fmt} ({path}): give a file ending in one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return write_text_atomic(path, buf.getvalue())


def torch_load_problem(e: BaseException) -> str:
    """What a failed ``torch.load(..., weights_only=True)`` means, in a few words instead of torch's
    paragraph (which suggests ``weights_only=False`` and filing an issue)."""
    text = str(e)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsupported:
        return (f"it holds a Python object ({unsupported.group(1)}) besides tensors, and only tensors are read "
                "(safe loading)")
    if "Weights only load failed" in text:
        return "it is not a file written by torch.save, or it holds Python objects besides tensors"
    if isinstance(e, EOFError) or "zip archive" in text or "central directory" in text:
        return "it is truncated or corrupt"
    return f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0][:200]}"
