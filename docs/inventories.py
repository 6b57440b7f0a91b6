"""Intersphinx inventories that never make the documentation build fail or hang.

Sphinx fetches every ``intersphinx_mapping`` inventory itself and warns when one
cannot be reached, and the build runs with ``-W``: offline, or behind a proxy
that swallows connections, that fails the build or stalls it. Instead,
:func:`cached_inventories` downloads each inventory here, in background threads
that the build waits for ``timeout`` seconds at most, keeps it in a cache
directory, and maps only the projects whose inventory is on disk. An offline
build therefore links to whatever an earlier online build cached, and renders
the rest of its references as plain text (``nitpicky`` is off), without a
warning.
"""

import os
import threading
import time
import urllib.request
import zlib
from pathlib import Path

# The first line of every Sphinx inventory (version 2, zlib-compressed body).
_HEADER = b"# Sphinx inventory version 2"


def _valid(data):
    """A complete version-2 inventory, not an error page or a truncated download."""
    if not data.startswith(_HEADER):
        return False
    # The header is four text lines; the rest is one zlib stream.
    body = data.split(b"\n", 4)[-1]
    try:
        zlib.decompress(body)
    except zlib.error:
        return False
    return True


def _download(url, path, timeout):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (OSError, ValueError):  # offline, refused, HTTP errors, bad URL
        return
    if _valid(data):
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        temporary.replace(path)  # readers see the old file or the new one, never half


def cached_inventories(projects, cache, *, offline=False, timeout=10.0):
    """``intersphinx_mapping`` for the projects whose inventory is (now) in ``cache``.

    Parameters
    ----------
    projects : dict of str to str
        Name -> base URL of the documentation (its inventory is ``objects.inv`` there).
    cache : path-like
        Directory of the cached inventories, ``<name>.inv``; created if missing.
    offline : bool, default=False
        Use the cache only, without trying the network.
    timeout : float, default=10.0
        Seconds the downloads may take together; a download still running then
        is abandoned (its daemon thread cannot delay the end of the build).

    Returns
    -------
    mapping : dict of str to (str, str)
        ``{name: (url, local inventory path)}``.
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    if not offline:
        threads = [
            threading.Thread(target=_download, daemon=True,
                             args=(url.rstrip("/") + "/objects.inv", cache / f"{name}.inv",
                                   timeout))
            for name, url in projects.items()
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    return {name: (url, str(cache / f"{name}.inv")) for name, url in projects.items()
            if (cache / f"{name}.inv").is_file()}
