"""The chunk inventory of an activation cache and the zarr store that enforces it.

zarr reads a missing chunk file as the fill value (zeros), so a cache that lost
a file to an interrupted copy would still read, and fit, without a word. A
finalized cache therefore records an *inventory*: every file below its root
(chunks and array metadata) with its size and CRC-32. :func:`check_inventory`
verifies existence and sizes when a cache is opened (one ``stat`` per file);
:class:`VerifiedStore` verifies the checksum of every file zarr reads (CRC-32
costs far less than the zstd decoding that follows it), refuses files the
inventory does not list, and raises once the cache at the path is no longer the
one the array was opened on. :meth:`VerifiedStore.verified_bytes` applies the
same checks for readers that decode chunks themselves
(:mod:`sklearn_lib.cache._chunk_read`).
"""

import json
import os
import zlib

import numpy as np
from zarr.storage import LocalStore, WrapperStore

from ..utils._atomic import WRITER_FILE

__all__ = ["VerifiedStore", "check_inventory", "take_inventory"]

# The group metadata holds the inventory, so it cannot list itself.
_ROOT_METADATA = "zarr.json"


def take_inventory(root):
    """``{key: [size, crc32]}`` of every file below ``root`` but the group metadata."""
    inventory = {}
    for folder, _, files in os.walk(root):
        for name in files:
            file = os.path.join(folder, name)
            key = os.path.relpath(file, root).replace(os.sep, "/")
            if key in (_ROOT_METADATA, WRITER_FILE):
                continue
            crc = 0
            with open(file, "rb") as f:
                while block := f.read(1 << 24):
                    crc = zlib.crc32(block, crc)
            inventory[key] = [os.path.getsize(file), crc]
    return inventory


def check_inventory(root, inventory, labels):
    """Raise if a file of the inventory is missing or has the wrong size."""
    for key, (size, _) in inventory.items():
        file = os.path.join(root, *key.split("/"))
        try:
            found = os.stat(file).st_size
        except FileNotFoundError:
            raise _corrupt(root, key, labels, "is missing") from None
        if found != size:
            raise _corrupt(
                root, key, labels, f"has {found} bytes where the cache wrote {size} (truncated "
                "or replaced)"
            )


def _describe(key, labels):
    """``'activations of layer 'fc1', chunk (2, 0)'`` for a store key."""
    parts = key.split("/")
    node = "/".join(parts[:2])
    label = labels.get(node, node)
    if len(parts) > 3 and parts[2] == "c":
        return f"{label}, chunk ({', '.join(parts[3:])})"
    return f"{label}, metadata {'/'.join(parts[2:]) or key}"


def _corrupt(root, key, labels, problem):
    file = os.path.join(root, *key.split("/"))
    return ValueError(
        f"the activation cache at {root!r} is damaged: {_describe(key, labels)} ({file}) "
        f"{problem}. Recreate the cache (or restore it from an intact copy)."
    )


class VerifiedStore(WrapperStore):
    """Read-only local store that serves only what the cache's inventory vouches for.

    Parameters
    ----------
    root : str
        The cache directory.
    description : dict
        The cache's description: its ``inventory`` and ``generation``.
    labels : dict of str to str
        Node path -> human name (``"activations of layer 'fc1'"``) for messages.
    """

    def __init__(self, root, description, labels, *, store=None):
        super().__init__(store if store is not None else LocalStore(root, read_only=True))
        self._root = root
        self._description = description
        self._labels = labels
        stat = os.stat(root)
        self._identity = (stat.st_dev, stat.st_ino)

    def _with_store(self, store):
        return type(self)(self._root, self._description, self._labels, store=store)

    def _replaced(self):
        """Why the cache at the path is not the one opened, or None if it is."""
        try:
            stat = os.stat(self._root)
            with open(os.path.join(self._root, _ROOT_METADATA), encoding="utf-8") as f:
                attrs = json.load(f).get("attributes", {})
        except (OSError, ValueError):
            return f"the activation cache at {self._root!r} was moved or deleted"
        generation = (attrs.get("sklearn_lib_cache") or {}).get("generation")
        if ((stat.st_dev, stat.st_ino) != self._identity
                or generation != self._description["generation"]):
            return f"the activation cache at {self._root!r} was replaced"
        return None

    def _fail(self, key, problem):
        reason = self._replaced()
        if reason is not None:
            return ValueError(
                f"{reason} after this array was opened; open the cache again to read it."
            )
        return _corrupt(self._root, key, self._labels, problem)

    def _check_root(self, key):
        """Raise if the directory at the path is no longer the one opened."""
        try:
            stat = os.stat(self._root)
        except OSError:
            stat = None
        if stat is None or (stat.st_dev, stat.st_ino) != self._identity:
            raise self._fail(key, "could not be read")

    def _check_size(self, key, found):
        size = self._description["inventory"][key][0]
        if found != size:
            raise self._fail(
                key, f"has {found} bytes where the cache wrote {size} (truncated or replaced)"
            )

    def _verified(self, key, data):
        """Whether the bytes ``data`` of file ``key`` (None: no file) are content, else raise.

        False means the file was never written, so zarr's fill value is the content.
        """
        expected = self._description["inventory"].get(key)
        if expected is None:
            if data is None:
                return False
            raise self._fail(key, "is not in the inventory written when the cache was finalized")
        if data is None:
            raise self._fail(key, "is missing")
        self._check_size(key, data.size)
        if zlib.crc32(data) != expected[1]:
            raise self._fail(key, "does not match the checksum the cache wrote (corrupted)")
        return True

    def verified_bytes(self, key):
        """The bytes of file ``key`` (uint8 array), verified as zarr's reads are; None if unwritten.

        For readers that decode a chunk themselves (:mod:`sklearn_lib.cache._chunk_read`):
        the same checks and messages as :meth:`get`, without zarr's buffers.
        """
        self._check_root(key)
        file = os.path.join(self._root, *key.split("/"))
        try:
            with open(file, "rb") as f:
                found = os.fstat(f.fileno()).st_size
                if key in self._description["inventory"]:
                    self._check_size(key, found)  # before reading a file of any size
                data = np.empty(found, dtype=np.uint8)
                data = data[: f.readinto(data)]
                if f.read(1):
                    raise self._fail(key, "grew while it was read (replaced)")
        except FileNotFoundError:
            data = None
        return data if self._verified(key, data) else None

    async def get(self, key, prototype, byte_range=None):
        self._check_root(key)
        if key == _ROOT_METADATA:
            return await self._store.get(key, prototype, byte_range)
        buffer = await self._store.get(key, prototype)
        if not self._verified(key, None if buffer is None else buffer.as_numpy_array()):
            return None  # never written: zarr's fill value is the content
        if byte_range is None:
            return buffer
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)
