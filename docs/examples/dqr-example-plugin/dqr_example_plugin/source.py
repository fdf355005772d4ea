"""``type: zip``: its config model and its backend factory.

The config model is what dqr validates a ``sources:`` entry against, so a
typo in a key is an error that suggests the right one. The factory runs only
when a job uses the source; the backend module (and pydicom) load only then.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

from pydantic import Field

from dqr.config import SourceConfig

if TYPE_CHECKING:
    from dqr.backend import Backend, SourceContext


class ZipSourceConfig(SourceConfig):
    """``type: zip``: serve the DICOM files inside one ZIP file, read-only."""

    type: Literal["zip"] = "zip"
    path: Path = Field(description="the ZIP file; relative to the site config")


def make_zip_backend(config: ZipSourceConfig, context: SourceContext) -> Backend:
    from dqr_example_plugin.backend import ZipBackend

    path = config.path.expanduser()
    return ZipBackend(path if path.is_absolute() else context.config_dir / path)


#: What ``dqr zip-studies`` writes: search columns identifying each study,
#: and the relabeling columns left for the user to fill in.
STUDY_CSV_HEADER = ("Study Instance UID", "Patient ID", "Study Date", "Subject", "Session")


def write_study_csv(export: Path, out: TextIO) -> int:
    """Write one query row per study of ``export``; return how many."""
    from dqr.model import StudyQuery
    from dqr_example_plugin.backend import ZipBackend

    backend = ZipBackend(export)
    try:
        # Empty filters: DICOM's universal match, every study.
        studies = list(backend.query_studies(StudyQuery(line=0, filters={})))
    finally:
        backend.close()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(STUDY_CSV_HEADER)
    for study in sorted(studies, key=lambda s: (s.patient_id, s.study_date, s.study_uid)):
        writer.writerow((study.study_uid, study.patient_id, study.study_date, "", ""))
    return len(studies)
