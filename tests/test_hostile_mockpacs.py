"""``dqr mock-pacs --config``: the config is read like the site config (one
safe YAML loader; file, line and key named; exit 2, no traceback). Only the
error paths run through the CLI: a valid config would start serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from dqr.plugins.testpacs.mockpacs import load_mock_config


@pytest.fixture
def mock_config(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "mock-pacs.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def test_the_on_fault_key_is_read_as_the_word_on(mock_config):
    _, servers = load_mock_config(mock_config("source: {synthetic: {patients: 1}}\ndicomweb:\n  faults:\n    on: qido\n"))
    assert servers["dicomweb"].faults.on == "qido"


def test_a_yes_value_is_still_a_boolean(mock_config):
    text = "dimse:\n  faults:\n    reject: {transient: no}\n"
    _, servers = load_mock_config(mock_config(text))
    assert servers["dimse"].faults.reject.transient is False


def test_an_unknown_section_is_named_with_its_line_and_the_nearest_one(mock_config, dqr):
    result = dqr("mock-pacs", "--config", mock_config("source: {synthetic: {patients: 1}}\ndicomwb: {port: 0}\n"))
    assert result.exit_code == 2
    assert "line 2" in result.stderr and "unknown key 'dicomwb'" in result.stderr
    assert "did you mean 'dicomweb'?" in result.stderr


def test_a_wrong_fault_value_names_key_line_and_value(mock_config, dqr):
    result = dqr("mock-pacs", "--config", mock_config("dicomweb:\n  faults:\n    on: wado-rs\n"))
    assert result.exit_code == 2
    assert "line 3" in result.stderr and "dicomweb.faults.on" in result.stderr and "got 'wado-rs'" in result.stderr


def test_an_unknown_source_key_is_named_with_its_line(mock_config, dqr):
    result = dqr("mock-pacs", "--config", mock_config("source:\n  synthetc: {patients: 1}\ndimse: {}\n"))
    assert result.exit_code == 2
    assert "line 2" in result.stderr and "unknown key 'source.synthetc'" in result.stderr


def test_every_problem_is_listed_at_once(mock_config, dqr):
    text = "dimse: {port: 70000}\ndicomweb: {faults: {delay: -1}}\n"
    result = dqr("mock-pacs", "--config", mock_config(text))
    assert result.exit_code == 2
    assert "dimse.port" in result.stderr and "dicomweb.faults.delay" in result.stderr


def test_a_duplicate_key_names_both_lines(mock_config, dqr):
    result = dqr("mock-pacs", "--config", mock_config("dimse: {port: 0}\ndimse: {port: 1}\n"))
    assert result.exit_code == 2
    assert "key 'dimse' appears twice (lines 1 and 2)" in result.stderr


def test_a_yaml_bomb_is_refused(mock_config, dqr):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    result = dqr("mock-pacs", "--config", mock_config("\n".join(lines) + "\n"))
    assert result.exit_code == 2
    assert "alias" in result.stderr


def test_a_missing_config_file_exits_2(tmp_path, dqr):
    result = dqr("mock-pacs", "--config", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml" in result.stderr


def test_a_config_that_is_not_a_mapping_exits_2(mock_config, dqr):
    result = dqr("mock-pacs", "--config", mock_config("- dimse\n"))
    assert result.exit_code == 2
    assert "mapping" in result.stderr


def test_a_source_folder_that_does_not_exist_names_the_file_and_line(mock_config, dqr):
    result = dqr("mock-pacs", "--config", mock_config("dimse: {port: 0}\nsource:\n  path: nowhere\n"))
    assert result.exit_code == 2
    assert "mock-pacs.yaml, line 2" in result.stderr and "not a folder of DICOM files" in result.stderr
