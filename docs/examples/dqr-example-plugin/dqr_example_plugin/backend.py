"""The ``zip`` backend: a ZIP export unpacked to a temporary folder and served
by dqr's in-memory PACS -- the same DICOM matching as ``type: memory``, and
instance bytes read from disk only when retrieved, so memory stays flat.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from dqr.errors import ConfigError
from dqr.plugins.testpacs.memory.backend import MemoryBackend
from dqr.plugins.testpacs.memory.pacs import MemoryPacs


class ZipBackend(MemoryBackend):
    """A :class:`dqr.backend.Backend` over the DICOM files of one ZIP file.

    Files that are not DICOM (a viewer, a README, a DICOMDIR) are skipped.
    The temporary folder lives until :meth:`close`, which the engine calls
    once at the end of the job.
    """

    def __init__(self, export: Path) -> None:
        self.export = export
        self._unpacked = tempfile.TemporaryDirectory(prefix="dqr-zip-")
        try:
            folder = Path(self._unpacked.name)
            _unpack(export, folder)
            super().__init__(MemoryPacs.from_folder(folder))
        except BaseException:
            self._unpacked.cleanup()
            raise

    def echo(self) -> str:
        return f"ZIP export {self.export}: {super().echo()}"

    def close(self) -> None:
        super().close()
        self._unpacked.cleanup()


def _unpack(export: Path, folder: Path) -> None:
    # A ConfigError is rendered by the CLI with exit code 2: the job stops
    # before anything is queried.
    try:
        with zipfile.ZipFile(export) as archive:
            # extractall() drops absolute paths and "..": nothing lands
            # outside the folder, whatever the archive's member names.
            archive.extractall(folder)
    except FileNotFoundError:
        raise ConfigError(f"zip source: {export} does not exist") from None
    except (zipfile.BadZipFile, IsADirectoryError):
        raise ConfigError(f"zip source: {export} is not a ZIP file") from None
