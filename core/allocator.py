"""The ``dqr`` process's memory allocator, set for buffers the size of an instance.

Every instance passes through a few bytes objects its own size (the PDUs'
fragments joined, the relabeled file), which CPython takes from ``malloc``.
glibc's defaults give such buffers back to the kernel as soon as they are
freed: an arena's free top beyond 128 KB is trimmed (``madvise``), and a
buffer over the mmap threshold is unmapped, so the next instance's buffers
are fresh pages the kernel must fault in and zero. On the benchmark's large
cohort (280 instances of 512 KB over C-GET) that was ~150,000 page faults,
four for every page stored, and ~0.3 s of kernel time in a 1.4 s run; with
freed buffers kept for reuse, ~17,000 (start-up's own).

Only the ``dqr`` command does this (:func:`dqr.cli.main`): a program that
imports dqr keeps its own allocator settings. A user's ``MALLOC_*``
variables or ``GLIBC_TUNABLES`` win: nothing is set then.
"""

from __future__ import annotations

import os
import sys

#: mallopt(3) parameters (glibc's malloc.h).
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: Buffers up to this size come from the arenas, where a freed one is
#: reused, instead of being mapped and unmapped one by one.
REUSE_UP_TO = 16 << 20
#: Free memory an arena keeps when it trims its top, for the next instances.
KEEP_FREE = 16 << 20


def keep_freed_buffers() -> bool:
    """Tell glibc's malloc to keep instance-sized buffers for reuse; whether
    it was done (not on other platforms or C libraries, nor where the user
    set the allocator up through the environment)."""
    if not sys.platform.startswith("linux"):
        return False
    if "GLIBC_TUNABLES" in os.environ or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # Both or neither: the threshold alone (which also freezes glibc's own
    # adjustment of it) would leave the trimming as it is.
    return bool(mallopt(_M_MMAP_THRESHOLD, REUSE_UP_TO)) and bool(mallopt(_M_TOP_PAD, KEEP_FREE))
