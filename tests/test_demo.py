"""The README's demo: configs/demo.yaml runs on a fresh machine with
nothing else running and produces a relabeled archive."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from conftest import archive_files

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_the_demo_config_produces_a_relabeled_archive(tmp_path, dqr):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    result = dqr("run", "--config", tmp_path / "configs" / "demo.yaml")
    assert result.exit_code == 0, result.stderr
    archive = tmp_path / "demo-archive" / "Demo"
    assert sorted(p.name for p in archive.iterdir()) == ["PAT00002", "Subj001", "Subj002", "Subj004"]
    ct = pydicom.dcmread(archive_files(archive / "Subj001" / "Subj001_CT1")[0])
    assert (str(ct.PatientName), ct.AccessionNumber) == ("Subj001", "Subj001_CT1")
    assert all(pydicom.dcmread(p).SeriesDescription != "Localizer" for p in archive_files(archive))


def test_the_site_example_config_is_valid(dqr, write_csv):
    result = dqr("validate", "--csv", write_csv("Patient ID\nP1\n"), "--config", CONFIGS / "site-example.yaml")
    assert result.exit_code == 0, result.stderr
