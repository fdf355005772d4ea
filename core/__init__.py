"""dqr: bulk DICOM query/retrieve driven by a CSV of studies.

The public surface for plugin authors is :data:`hookimpl` plus the plain data
types in :mod:`dqr.model` and the errors in :mod:`dqr.errors`.
"""

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@dqr.hookimpl``.
hookimpl = pluggy.HookimplMarker("dqr")

__all__ = ["__version__", "hookimpl"]
