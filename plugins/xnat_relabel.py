"""Relabel on import exactly as XNAT DQR does (the reference's rules):

- Subject -> Patient's Name (0010,0010) and Patient ID (0010,0020)
- Session -> Study ID (0020,0010) and Accession Number (0008,0050)

Only labels the user asked for are written; a label derived from the
study's own tags (no Subject/Session given) changes nothing in the DICOM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dqr

if TYPE_CHECKING:  # keeps pydicom out of `dqr --help`
    from dqr.relabel import RelabelContext

SUBJECT_KEYWORDS = ("PatientName", "PatientID")
SESSION_KEYWORDS = ("StudyID", "AccessionNumber")


@dqr.hookimpl
def dqr_relabel(context: RelabelContext) -> None:
    if context.labels.relabel_subject:
        for keyword in SUBJECT_KEYWORDS:
            context.set(keyword, context.labels.subject)
    if context.labels.relabel_session:
        for keyword in SESSION_KEYWORDS:
            context.set(keyword, context.labels.session)
