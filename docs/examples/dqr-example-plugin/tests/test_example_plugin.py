"""The example plugin's own tests, as a plugin author would write them.

They run against the installed package (``pip install -e .[test]`` beside an
installed dqr), so the first one checks that dqr really discovers it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dqr import pluginmanager
from dqr.backend import Backend
from dqr.model import Labels, Series, Study, StudyQuery
from dqr.plugins.testpacs.memory.synthetic import CohortSpec, write_cohort
from dqr.relabel import RelabelContext
from dqr_example_plugin import dqr_relabel
from dqr_example_plugin.backend import ZipBackend

SPEC = CohortSpec(patients=2, studies_per_patient=1, instances_per_series=1)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """A ZIP export of a small synthetic cohort."""
    write_cohort(SPEC, tmp_path / "cohort")
    return Path(shutil.make_archive(str(tmp_path / "export"), "zip", tmp_path / "cohort"))


def relabel(labels: Labels) -> RelabelContext:
    context = RelabelContext(Dataset(), labels, Study("1.2.3"), Series("1.2.3", "1.2.3.4"))
    dqr_relabel(context=context)
    return context


def test_entry_point_registers_the_zip_backend_type() -> None:
    assert pluginmanager.backend_types()["zip"].plugin == "dqr-example-plugin:example"


def test_zip_backend_is_a_dqr_backend(export: Path) -> None:
    backend = ZipBackend(export)
    try:
        assert isinstance(backend, Backend)
    finally:
        backend.close()


def test_zip_backend_answers_a_universal_study_query_with_every_study(export: Path) -> None:
    backend = ZipBackend(export)
    try:
        studies = list(backend.query_studies(StudyQuery(line=0, filters={})))
    finally:
        backend.close()

    assert len(studies) == SPEC.n_studies


def test_relabel_writes_a_requested_session_into_the_time_point_id() -> None:
    context = relabel(Labels("S01", "S01_V1", relabel_subject=True, relabel_session=True))

    assert context.dataset.ClinicalTrialTimePointID == "S01_V1"


def test_relabel_keeps_the_time_point_ids_original_value_as_provenance() -> None:
    context = relabel(Labels("S01", "S01_V1", relabel_session=True))

    assert context.replaced == {"ClinicalTrialTimePointID": ""}


def test_relabel_leaves_a_derived_session_label_out_of_the_dicom() -> None:
    context = relabel(Labels("PAT1", "1", relabel_session=False))

    assert "ClinicalTrialTimePointID" not in context.dataset
