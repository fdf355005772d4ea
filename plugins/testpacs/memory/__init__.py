"""The ``memory`` backend: an in-memory PACS loaded from a folder of DICOM
files or generated as a synthetic cohort. The embedded default: it needs no
server, so ``dqr run --config configs/demo.yaml`` works anywhere.

Also adds ``dqr demo-data``, which writes the synthetic cohort to a folder.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from pydantic import Field, model_validator

import dqr
from dqr.config import SourceConfig, Strict, resolve_path
from dqr.plugins.testpacs.memory.hostile import HostileFaults

if TYPE_CHECKING:
    from dqr.backend import SourceContext


class SyntheticCohort(Strict):
    """A generated cohort (see :mod:`dqr.plugins.testpacs.memory.synthetic`)."""

    patients: int = Field(4, ge=1)
    studies_per_patient: int = Field(2, ge=1)
    instances_per_series: int = Field(3, ge=1)
    rows: int = Field(16, ge=1, le=4096)
    columns: int = Field(16, ge=1, le=4096)
    seed: int = 0


class MemorySourceConfig(SourceConfig):
    """``type: memory``: serve DICOM files from ``path``, or a synthetic
    cohort described by ``synthetic``."""

    type: Literal["memory"] = "memory"
    path: str | None = None
    synthetic: SyntheticCohort | None = None
    hostile: HostileFaults | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> "MemorySourceConfig":
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of `path` (a folder of DICOM files) or `synthetic`")
        return self


def load_pacs(config: MemorySourceConfig, config_dir: Path):  # -> MemoryPacs
    """Build the in-memory PACS a memory source config describes."""
    from dqr.errors import ConfigError
    from dqr.plugins.testpacs.memory.pacs import MemoryPacs
    from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort

    if config.synthetic is not None:
        return MemoryPacs.from_datasets(generate_cohort(CohortSpec(**config.synthetic.model_dump())))
    folder = resolve_path(config.path, config_dir)
    if not folder.is_dir():
        raise ConfigError(
            f"memory source: {folder} is not a folder of DICOM files "
            "(create one with `dqr demo-data DIR`, or use `synthetic:`)"
        )
    return MemoryPacs.from_folder(folder)


def make_backend(config: MemorySourceConfig, context: "SourceContext"):
    from dqr.plugins.testpacs.memory.backend import MemoryBackend
    from dqr.plugins.testpacs.memory.hostile import rewrite

    return MemoryBackend(rewrite(load_pacs(config, context.config_dir), config.hostile), config.hostile, context.limits)


@dqr.hookimpl
def dqr_register_backends(register):
    register("memory", make_backend, MemorySourceConfig)


@dqr.hookimpl
def dqr_register_commands(app: typer.Typer) -> None:
    @app.command("demo-data", rich_help_panel="Test PACS")
    def demo_data(
        folder: Annotated[Path, typer.Argument(help="Folder to write the cohort to (created).")],
        patients: Annotated[int, typer.Option(min=1, help="Number of patients.")] = 4,
        studies_per_patient: Annotated[int, typer.Option(min=1, help="Studies per patient.")] = 2,
        instances_per_series: Annotated[int, typer.Option(min=1, help="Instances per series.")] = 3,
        seed: Annotated[int, typer.Option(help="Changes every UID and value.")] = 0,
    ) -> None:
        """Write a deterministic synthetic cohort as DICOM files.

        Example: dqr demo-data ./demo-data --patients 10
        """
        from dqr.plugins.testpacs.memory.synthetic import CohortSpec, write_cohort

        spec = CohortSpec(
            patients=patients,
            studies_per_patient=studies_per_patient,
            instances_per_series=instances_per_series,
            seed=seed,
        )
        written = write_cohort(spec, folder)
        typer.echo(f"wrote {len(written)} instances of {spec.n_studies} studies to {folder}")
