"""pytest fixtures for dqr and its plugins (registered through the
``pytest11`` entry point, so installing dqr makes them available to any
plugin's test suite).

- :mod:`dqr.testing.fixtures_orthanc`: a private Orthanc, seeded.
- :mod:`dqr.testing.fixtures_dimse`: the in-memory PACS over DIMSE.
- :mod:`dqr.testing.fixtures_dicomweb`: the in-memory PACS over HTTP.
- :mod:`dqr.testing.fixtures_postgres`: a private PostgreSQL cluster.
"""

from __future__ import annotations

from dqr.testing.fixtures_dicomweb import *  # noqa: F403
from dqr.testing.fixtures_dimse import *  # noqa: F403
from dqr.testing.fixtures_orthanc import *  # noqa: F403
from dqr.testing.fixtures_postgres import *  # noqa: F403
