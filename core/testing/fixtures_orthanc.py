"""pytest fixtures: a private Orthanc (see :mod:`dqr.testing.orthanc`).

- ``orthanc`` (session): one server, seeded once with the synthetic cohort
  ``orthanc_cohort_spec``. Shared by every test: treat it as read-only.
- ``orthanc_cohort_spec`` (session): the :class:`CohortSpec` it was seeded with
  (also ``orthanc.cohort_spec``).
- ``orthanc_factory`` (function): ``orthanc_factory(**start_kwargs)`` starts a
  fresh, empty server of your own; all are stopped after the test.

Without Orthanc installed these fixtures skip the test, except under
``CI=true``, where a skip would hide that the real-PACS tests never ran:
there they fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dqr.plugins.testpacs.memory.synthetic import DEFAULT_COHORT, CohortSpec, generate_cohort
from dqr.testing import require
from dqr.testing.orthanc import DICOMWEB_PLUGIN, INSTALL_HINT, OrthancServer, find_orthanc, stop_all

__all__ = ["orthanc", "orthanc_cohort_spec", "orthanc_factory"]

#: Small enough to seed in well under a second, big enough for every template
#: (CT, MR, PET-CT), several patients and multi-study patients.
ORTHANC_COHORT = DEFAULT_COHORT


def require_orthanc() -> None:
    """Skip the current test when Orthanc (with its DICOMweb plugin) is not
    installed; fail it instead when running in CI."""
    require(
        find_orthanc() is not None and DICOMWEB_PLUGIN.is_file(),
        f"Orthanc with its DICOMweb plugin is not installed; {INSTALL_HINT}",
        "the real-PACS tests",
    )


@pytest.fixture(scope="session")
def orthanc_cohort_spec() -> CohortSpec:
    """The synthetic cohort the ``orthanc`` fixture is seeded with."""
    return ORTHANC_COHORT


@pytest.fixture(scope="session")
def orthanc(
    tmp_path_factory: pytest.TempPathFactory, orthanc_cohort_spec: CohortSpec
) -> Iterator[OrthancServer]:
    """One Orthanc for the whole session, seeded with ``orthanc_cohort_spec``."""
    require_orthanc()
    server = OrthancServer.start(tmp_path_factory.mktemp("orthanc"))
    try:
        server.seed(generate_cohort(orthanc_cohort_spec))
        server.cohort_spec = orthanc_cohort_spec
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., OrthancServer]]:
    """Start empty Orthancs of the test's own: ``orthanc_factory(aet="PACS2",
    modalities={...})`` takes :meth:`OrthancServer.start`'s keyword arguments."""
    require_orthanc()
    started: list[OrthancServer] = []

    def start(**kwargs: Any) -> OrthancServer:
        server = OrthancServer.start(tmp_path_factory.mktemp("orthanc"), **kwargs)
        started.append(server)
        return server

    yield start
    stop_all(started)
