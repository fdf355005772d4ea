"""pytest fixtures for dqr and its plugins (registered through the
``pytest11`` entry point, so installing dqr makes them available to any
plugin's test suite).

- :mod:`dqr.testing.fixtures_orthanc`: a private Orthanc, seeded.
- :mod:`dqr.testing.fixtures_dimse`: the in-memory PACS over DIMSE.
- :mod:`dqr.testing.fixtures_dicomweb`: the in-memory PACS over HTTP.
- :mod:`dqr.testing.fault_proxy`: a TCP proxy that fragments, delays and cuts.
- :mod:`dqr.testing.dcmqrscp`: dcmtk's dcmqrscp, a second real Q/R SCP.
- :mod:`dqr.testing.fixtures_destinations`: a Storage SCP and a STOW-RS server to send to.
- :mod:`dqr.testing.fixtures_postgres`: a private PostgreSQL cluster.
"""

from __future__ import annotations

from dqr.testing.dcmqrscp import *  # noqa: F403, E402
from dqr.testing.fault_proxy import *  # noqa: F403, E402
from dqr.testing.fixtures_destinations import *  # noqa: F403, E402
from dqr.testing.fixtures_dicomweb import *  # noqa: F403
from dqr.testing.fixtures_dimse import *  # noqa: F403
from dqr.testing.fixtures_orthanc import *  # noqa: F403
from dqr.testing.fixtures_postgres import *  # noqa: F403
