"""Bank files as a service sees them: a folder of ``*.safetensors`` served by name, each file's identity, the lock
that orders every process's updates of one file, and a detector read from a file (reusing a network already
loaded for the same configuration).

A bank file is only ever replaced whole (``TemplateBank.save`` renames a complete temporary over it), so a
file's identity ``(inode, size, mtime)`` changes with every save, by any process on any machine sharing the
folder: comparing identities is how a replica learns that its copy is stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .bank import TemplateBank
from .detector import HETMM

SUFFIX = ".safetensors"
IDENTITY_RETRIES = 3  # a file replaced while it is read is read again, at most this many times


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime_ns)`` of ``path``, ``None`` when there is no such file."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def scan(folder: Path | None, only: Path | None) -> dict[str, Path]:
    """``{name: path}`` of the bank files served: every ``folder/*.safetensors`` under its stem (hidden names,
    temporaries and folders left out), or ``only`` alone."""
    if only is not None:
        return {only.stem: only} if only.is_file() else {}
    return {path.stem: path for path in sorted(folder.iterdir())
            if path.name.endswith(SUFFIX) and not path.name.startswith(".") and path.is_file()}


@contextlib.contextmanager
def update_lock(path: Path):
    """Held while one update of the bank at ``path`` reads, extends and writes it: an exclusive ``flock`` on a
    hidden sidecar file (``.<name>.lock``; the bank file itself is replaced by every save, so a lock on it would
    lock a file nobody reads again). Each holder opens the sidecar anew, and ``flock`` locks belong to the open
    file, so it orders the updates of threads, of processes on this machine and, on a shared volume that supports
    locks (NFSv4, CephFS, EFS), of every machine."""
    descriptor = os.open(path.with_name(f".{path.stem}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the flock


def read_detector(path: Path, options: dict, previous: HETMM | None = None) -> tuple[HETMM, tuple]:
    """``(detector, identity)``: the bank at ``path`` behind a detector, calibrated, and the identity of the file it
    came from. With ``previous`` made for the same configuration, its network is reused (only the bank is read);
    otherwise the detector is made from the bank as ``HETMM.load`` makes it. Raises what ``TemplateBank.load``
    raises for a file that fails its checks."""
    for _ in range(IDENTITY_RETRIES):
        before = file_identity(path)
        if before is None:
            raise FileNotFoundError(f"bank: no file at {path}")
        bank = TemplateBank.load(path)
        if file_identity(path) == before:
            break
    else:
        raise RuntimeError(f"bank: {path} was replaced {IDENTITY_RETRIES} times while it was read")
    if previous is not None and _same_config(bank.config, previous.bank.config):
        detector = previous.with_bank(bank)
    else:
        detector = HETMM.from_bank(bank, **options)
    detector.thresholds()  # a bank saved before calibration is calibrated now, not on the first request
    return detector, before


def _same_config(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def resident_bytes(detector: HETMM) -> int:
    """Bytes the detector's bank holds in memory (``TemplateBank.resident_bytes``; the network is not counted:
    banks of one backbone differ by their templates)."""
    return detector.bank.resident_bytes()


@dataclass(eq=False)
class ServedBank:
    """One bank file served under ``name``. ``detector`` is ``None`` until first use and after being dropped;
    ``identity`` is that of the file last read and found good (the one ``detector`` came from, when loaded);
    ``rejected`` that of a file that failed its checks (not read again until it changes)."""

    name: str
    path: Path
    identity: tuple | None = None
    detector: HETMM | None = None
    templates: int = 0
    thresholds: tuple | None = None
    rejected: tuple | None = None
    last_used: float = 0.0
    active: int = 0  # requests queued or being scored: the bank is not dropped under them
    lock: object = field(default=None, repr=False)  # an asyncio.Lock, made by the service

    def took(self, detector: HETMM, identity: tuple) -> None:
        """Record ``detector``, read from the file of ``identity``, as this bank's."""
        self.detector, self.identity, self.rejected = detector, identity, None
        self.templates = len(detector.bank)
        self.thresholds = detector.thresholds()
