"""dqr-example-plugin: a worked example of a third-party dqr plugin.

Through dqr's public hooks only, it adds

- a source type, ``type: zip``: the DICOM files inside a ZIP export (what a
  PACS download or a hospital's sharing portal hands out), served read-only;
- a relabel step: the session label is also written into Clinical Trial Time
  Point ID (0012,0050), where trial tools look for the visit;
- a command, ``dqr zip-studies EXPORT.zip``: the studies of an export as a
  query CSV to start from.

dqr finds this module through the ``dqr`` entry point in pyproject.toml.
Importing it stays cheap: the backend and pydicom load only when used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

import dqr
from dqr.errors import InputError
from dqr_example_plugin.source import ZipSourceConfig, make_zip_backend

if TYPE_CHECKING:
    from dqr.relabel import RelabelContext


@dqr.hookimpl
def dqr_register_backends(register) -> None:
    register("zip", make_zip_backend, ZipSourceConfig)


@dqr.hookimpl
def dqr_relabel(context: RelabelContext) -> None:
    # As the built-in XNAT rules do: write only a label the user asked for.
    # A label derived from the study's own tags names directories and
    # changes nothing in the DICOM. context.set() keeps the original value
    # in the session manifest.
    if context.labels.relabel_session:
        context.set("ClinicalTrialTimePointID", context.labels.session)


@dqr.hookimpl
def dqr_register_commands(app: typer.Typer) -> None:
    @app.command("zip-studies", rich_help_panel="dqr-example-plugin")
    def zip_studies(
        export: Annotated[Path, typer.Argument(metavar="EXPORT.zip", help="A ZIP file of DICOM files.")],
    ) -> None:
        """Print the studies of a ZIP export as a query CSV, one row per study.

        Fill in Subject and Session, then run it against a `type: zip` source.

        Example: dqr zip-studies export.zip > queries.csv
        """
        from dqr_example_plugin.source import write_study_csv

        try:
            write_study_csv(export, sys.stdout)
        except InputError as error:
            messages = "; ".join(problem.message for problem in error.problems)
            raise typer.BadParameter(messages, param_hint="EXPORT.zip") from None
