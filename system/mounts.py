"""Which filesystem a path lives on, read from the kernel's mount table (``/proc/self/mountinfo``).

Used to keep SQLite off network filesystems: its locking is unreliable over NFS, Lustre, GPFS and
friends (https://www.sqlite.org/faq.html#q5), and the jobs of an array write to one store at once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
#: filesystem types that are network (or cluster) filesystems; every FUSE mount counts too
NETWORK_TYPES = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs",
                           "9p", "afs", "ocfs2", "gfs2", "panfs", "wekafs"})
_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    point: str  # where it is mounted
    fstype: str  # e.g. ext4, nfs4, fuse.sshfs
    source: str  # e.g. server:/export

    @property
    def network(self) -> bool:
        return is_network(self.fstype)


def is_network(fstype: str) -> bool:
    """Whether a filesystem type is a network filesystem (``fuse`` and every ``fuse.*`` included)."""
    return fstype in NETWORK_TYPES or fstype == "fuse" or fstype.startswith("fuse.")


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``/proc/<pid>/mountinfo`` text (``proc(5)``), in the kernel's order."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 7:
            continue
        head, _, tail = line.partition(" - ")
        point = _ESCAPE.sub(lambda m: chr(int(m[1], 8)), head.split()[4])
        rest = tail.split()
        out.append(Mount(point=point, fstype=rest[0], source=rest[1] if len(rest) > 1 else ""))
    return out


def mount_of(path: str | os.PathLike, mountinfo: str | None = None) -> Mount:
    """The mount that holds ``path`` (its nearest existing parent, resolved): the longest mount point
    above it, the later mount winning (mounts stack).  ``mountinfo``: a table's text (default: this
    process's)."""
    mounts = parse_mountinfo(MOUNTINFO.read_text() if mountinfo is None else mountinfo)
    p = Path(path).expanduser().absolute()
    if mountinfo is None:  # this machine's table: the path as the kernel sees it (a missing one: its parent)
        while not p.exists() and p != p.parent:
            p = p.parent
        p = p.resolve()
    target = str(p)
    best: Mount | None = None
    for m in mounts:
        inside = target == m.point or target.startswith(m.point.rstrip("/") + "/")
        if inside and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best or Mount(point="/", fstype="unknown", source="")
