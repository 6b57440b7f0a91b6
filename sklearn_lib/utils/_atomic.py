"""Replace a directory by a finished one so that an interruption never loses both.

Everything the package writes as a directory (an activation cache, a saved
graph, the demo's output folder) is written into a temporary sibling
``<path>.tmp-<uuid>`` and moved to ``<path>`` by :func:`replace_dir` once it is
complete. POSIX cannot rename a directory over a non-empty one, so replacing
takes two renames: ``path -> <path>.old-<uuid>``, then ``tmp -> path``. A kill
between the two leaves nothing at ``path`` and the intact previous copy in the
``.old-`` sibling; :func:`tidy`, which every entry point (create, open, save,
load) calls first, moves that copy back, so at every instant a reader sees the
old or the new complete object.

Siblings are removed only when they are provably ours: the name pattern plus,
for an ``.old-`` copy, the caller's own completeness check, and for a ``.tmp-``
write the writer file inside naming a process of this host that no longer runs.
Anything else is left alone and named in messages.

The same rule guards ``overwrite=True``: a directory is replaced only when it
is one of ours *and* every file in it is one the format lists (the caller's
``foreign`` callable names the others, see :func:`foreign_files`), so a file a
user put inside a cache or a saved graph is never deleted with it. Single files
(GraphML exports) are written to a ``.tmp-`` sibling and renamed over the
target by :func:`write_file`, after the same checks.
"""

import json
import os
import re
import shutil
import socket
import sys
import uuid
import warnings

__all__ = ["check_target", "foreign_files", "make_temp_dir", "replace_dir", "tidy",
           "write_file"]

# Written into every temporary directory; names the process writing it.
WRITER_FILE = ".sklearn_lib_writer.json"
_SIBLING = re.compile(r"\.(tmp|old)-[0-9a-f]{32}")


def make_temp_dir(path, kind):
    """Create the temporary sibling of ``path`` a new ``kind`` is written into.

    Parameters
    ----------
    path : str
        Absolute final location.
    kind : str
        What is written (e.g. ``"ActivationCache"``), recorded in the writer file.

    Returns
    -------
    tmp : str
        The new, empty-but-for-the-writer-file directory.
    """
    parent = os.path.dirname(path)
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise NotADirectoryError(
            f"cannot write {path!r}: its parent {parent!r} exists and is not a directory."
        )
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    os.makedirs(tmp)
    record = {"kind": kind, "host": socket.gethostname(), "pid": os.getpid()}
    with open(os.path.join(tmp, WRITER_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f)
    return tmp


def check_target(path, overwrite, is_ours, what, foreign=None):
    """Raise unless ``path`` is free, or holds one of ours and ``overwrite`` is set.

    A symbolic link is never replaced: replacing it would either write through
    it into a folder elsewhere or silently turn the link into a directory.

    Parameters
    ----------
    path : str
        Absolute location.
    overwrite : bool
        Whether the caller may replace one of ours.
    is_ours : callable
        ``is_ours(path)``: True when ``path`` holds an object of this kind.
    what : str
        The object's name in messages.
    foreign : callable, optional
        ``foreign(path)``: the files inside ``path`` (relative, ``/``-separated)
        that its format does not list. Any makes ``path`` not provably ours, so
        it is refused even with ``overwrite=True`` and the files are named.
    """
    if not os.path.lexists(path):
        return
    if os.path.islink(path):
        raise FileExistsError(
            f"{path!r} is a symbolic link (to {os.readlink(path)!r}); refusing to replace a "
            f"link. Pass the link's target {os.path.realpath(path)!r} to write there."
        )
    if not is_ours(path):
        raise FileExistsError(
            f"{path!r} exists and is not {_article(what)} {what}; refusing to replace it even "
            "with overwrite=True."
        )
    if not overwrite:
        raise FileExistsError(
            f"{path!r} already exists; pass overwrite=True to replace an existing {what}."
        )
    others = foreign(path) if foreign is not None else []
    if others:
        shown = others[:20] + ([f"... ({len(others) - 20} more)"] if len(others) > 20 else [])
        raise FileExistsError(
            f"{path!r} is {_article(what)} {what}, but it also holds files that the {what} "
            f"did not write: {shown}. Refusing to replace it even with overwrite=True, "
            "since that would delete them: move them out of the folder first, or write to "
            "another path."
        )


def foreign_files(root, listed):
    """Files below ``root`` (relative, ``/``-separated) for which ``listed(key)`` is False.

    Directories are not files: an empty folder holds nothing to lose. Symbolic
    links are always foreign (the package never writes one).
    """
    found = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(
                os.path.join(folder, d))):
            file = os.path.join(folder, name)
            key = os.path.relpath(file, root).replace(os.sep, "/")
            if os.path.islink(file) or not listed(key):
                found.append(key)
    return sorted(found)


def write_file(path, write, *, overwrite, is_ours, what):
    """Write the single file ``path`` by ``write(tmp)`` into a sibling, then rename it over.

    ``path`` is checked as :func:`check_target` does (free, or one of ours and
    ``overwrite``); a directory there is never replaced. An error or a kill
    while writing leaves the previous file as it was.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(f"{path!r} is a directory; expected the path of a file.")
    check_target(path, overwrite, is_ours, what)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path!r}: the folder {parent!r} does not exist.")
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        write(tmp)
        check_target(path, overwrite, is_ours, what)  # another writer may have come first
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def replace_dir(tmp, path):
    """Move the finished directory ``tmp`` to ``path``, replacing what is there.

    The caller has checked with :func:`check_target` that ``path`` may be
    replaced. On an error the previous object is put back; a kill between the
    two renames is repaired by the next :func:`tidy`.
    """
    marker = os.path.join(tmp, WRITER_FILE)
    if os.path.exists(marker):
        os.remove(marker)
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    old = f"{path}.old-{uuid.uuid4().hex}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if os.path.lexists(old) and not os.path.lexists(path):
            os.rename(old, path)
        raise
    _remove_tree(old)


def tidy(path, is_ours, what):
    """Repair an interrupted replacement of ``path`` and remove stale siblings.

    Parameters
    ----------
    path : str
        Absolute location of the object.
    is_ours : callable
        ``is_ours(p)`` is True when ``p`` holds a complete object of this kind.
    what : str
        The object's name in messages.

    Returns
    -------
    pending : list of str
        ``.tmp-`` siblings still there: writes in progress, or interrupted ones
        whose writer cannot be proven gone.
    """
    parent, base = os.path.split(path)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    olds, tmps = [], []
    for name in sorted(names):
        match = _SIBLING.fullmatch(name[len(base):]) if name.startswith(base) else None
        if match:
            (olds if match.group(1) == "old" else tmps).append(os.path.join(parent, name))
    olds = [p for p in olds if not os.path.islink(p) and is_ours(p)]
    if olds and not os.path.lexists(path):
        # Only one replacement can be interrupted before the next tidy repairs it;
        # should there be several, the last one moved aside was the one at ``path``.
        newest = max(olds, key=lambda p: os.stat(p).st_ctime)
        try:
            os.rename(newest, path)
        except OSError as exc:
            raise FileNotFoundError(
                f"no {what} at {path!r}: an interrupted replacement left the intact previous "
                f"{what} at {newest!r} and it could not be moved back ({exc}). Rename it to "
                f"{path!r}."
            ) from None
        warnings.warn(
            f"restored the {what} at {path!r} from {newest!r}, where an interrupted "
            "replacement had left it.",
            stacklevel=3,
        )
        olds.remove(newest)
    if not os.path.islink(path) and is_ours(path):
        # The copies moved aside are superseded by the complete object at ``path``.
        for old in olds:
            _try_remove(old)
    return [tmp for tmp in tmps if not (_writer_gone(tmp) and _try_remove(tmp))]


def _try_remove(path):
    """Remove a stale sibling if the file system lets us (reading must work on read-only ones)."""
    try:
        _remove_tree(path)
    except OSError:
        return False
    return True


def _writer_gone(tmp):
    """True only if ``tmp`` names, in its writer file, a process of this host that has ended."""
    try:
        with open(os.path.join(tmp, WRITER_FILE), encoding="utf-8") as f:
            record = json.load(f)
        host, pid = record["host"], record["pid"]
    except (OSError, ValueError, TypeError, KeyError):
        return False
    # os.kill(pid, 0) probes a process on POSIX only (on Windows it would terminate it).
    if os.name != "posix" or host != socket.gethostname() or not isinstance(pid, int):
        return False
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: the process exists under another user
        return False
    return False


def _remove_tree(path):
    """Delete a directory of ours; another process tidying at the same time may beat us to it."""

    def ignore_missing(function, name, error):
        # ``onexc`` passes the exception, the older ``onerror`` an exc_info triple.
        error = error if isinstance(error, BaseException) else error[1]
        if not isinstance(error, FileNotFoundError):
            raise error

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=ignore_missing)
    else:
        shutil.rmtree(path, onerror=ignore_missing)


def _article(word):
    return "an" if word[:1].lower() in "aeiou" else "a"
