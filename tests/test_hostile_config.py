"""The site config is untrusted input: a wrong value is named with what was
found and the nearest valid choice, and YAML tricks (bombs, recursive
aliases, duplicate keys, deep nesting) are refused quickly with the line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dqr.config import load_config
from dqr.errors import ConfigError

BASE = """\
project: Test
sources:
  main:
    type: memory
    synthetic: {patients: 2}
"""

BILLION_LAUGHS = """\
project: Test
sources:
  main: {type: memory, synthetic: {patients: 2}}
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.fixture
def config_file(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "site.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_config(path)
    return [str(p) for p in error.value.problems]


def test_an_invalid_choice_names_the_value_found(config_file, dqr):
    result = dqr("validate", "--csv", config_file(BASE), "--config", config_file(BASE + "session_label: NoSuchRule\n"))
    assert result.exit_code == 2
    assert "session_label" in result.stderr and "got 'NoSuchRule'" in result.stderr


def test_an_invalid_choice_suggests_the_nearest_valid_one(config_file):
    [message] = problems(config_file(BASE + "session_label: StudyId\n"))
    assert "line 6" in message and "got 'StudyId'" in message and "did you mean 'StudyID'?" in message


def test_a_value_of_the_wrong_type_names_the_value_found(config_file):
    [message] = problems(config_file(BASE + "limits:\n  max_queries: many\n"))
    assert "limits.max_queries" in message and "got 'many'" in message and "line 7" in message


def test_a_backend_choice_names_the_value_and_the_nearest_valid_one(config_file):
    text = "sources:\n  pacs:\n    type: dimse\n    host: 127.0.0.1\n    port: 104\n    called_aet: PACS\n    retrieve: c-gett\n"
    messages = problems(config_file(text))
    [message] = [m for m in messages if "retrieve" in m]
    assert "sources.pacs.retrieve" in message and "got 'c-gett'" in message
    assert "did you mean 'c-get'?" in message and "line 7" in message


def test_a_yaml_bomb_is_refused_within_a_second(config_file):
    path = config_file(BILLION_LAUGHS)
    started = time.monotonic()
    [message] = problems(path)
    assert time.monotonic() - started < 1
    assert "alias" in message and "expand" in message


def test_a_yaml_bomb_exits_2(config_file, dqr):
    result = dqr("validate", "--csv", config_file(BASE), "--config", config_file(BILLION_LAUGHS))
    assert result.exit_code == 2
    assert "alias" in result.stderr


def test_a_recursive_alias_is_refused(config_file):
    [message] = problems(config_file(BASE + "x: &x [1, *x]\n"))
    assert "refers to itself" in message and "line 6" in message


def test_a_few_aliases_are_still_accepted(config_file):
    text = (
        "project: Test\nsources:\n  a: {type: memory, synthetic: {patients: 2}, limits: &l {max_queries: 2}}\n"
        "  b: {type: memory, synthetic: {patients: 2}, limits: *l}\nsource: a\n"
    )
    loaded = load_config(config_file(text))
    assert loaded.limits_for("b").max_queries == 2


def test_deep_nesting_is_refused_without_a_traceback(config_file):
    [message] = problems(config_file(BASE + "x: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert "nested" in message


def test_a_duplicate_top_level_key_names_both_lines(config_file):
    [message] = problems(config_file(BASE + "archive: a1\nproject: Other\n"))
    assert "key 'project' appears twice (lines 1 and 7)" in message


def test_a_duplicate_nested_key_names_both_lines(config_file):
    text = "sources:\n  main:\n    type: memory\n    synthetic: {patients: 2}\n    type: memory\n"
    [message] = problems(config_file(text))
    assert "key 'sources.main.type' appears twice (lines 3 and 5)" in message


def test_a_duplicate_key_in_a_flow_mapping_is_refused(config_file):
    [message] = problems(config_file(BASE + "limits: {retries: 1, retries: 2}\n"))
    assert "key 'limits.retries' appears twice (lines 6 and 6)" in message


def test_a_key_given_explicitly_beside_a_merge_is_not_a_duplicate(config_file):
    text = (
        "project: Test\nbase: &base {max_queries: 2, retries: 1}\n"
        "sources:\n  main: {type: memory, synthetic: {patients: 2}}\n"
        "limits:\n  <<: *base\n  retries: 4\n"
    )
    messages = problems(config_file(text))  # `base:` is an unknown key, nothing else
    assert len(messages) == 1 and "unknown key 'base'" in messages[0]
