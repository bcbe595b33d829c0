"""Errors of saved VMs on disk (see ``hypemand.errors`` for how they map to responses)."""

from __future__ import annotations

from hypemand.errors import DomainError


class SavedVMCorrupt(DomainError):
    """A saved VM's file (an instance's standby, or a stored snapshot's) is missing or no longer
    matches what was recorded when it was written. The code stays the API's ``snapshot_corrupt``."""

    status = 409
    code = "snapshot_corrupt"


class SparseCopyUnsupported(DomainError):
    """The filesystem cannot report holes, so a copy would silently become dense.

    Guest RAM files are mostly holes (a 4 GiB guest may use 200 MB); a dense copy would fill
    the disk, so there is deliberately no dense fallback.
    """

    status = 500
    code = "sparse_copy_unsupported"


class CompressionCancelled(Exception):
    """A compression or expansion job stopped because its cancel event was set.

    Not a ``DomainError``: cancelling is the caller's own decision (a restore preempting the
    compressor), never something to report to an API client.
    """
