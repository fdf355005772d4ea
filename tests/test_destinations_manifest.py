"""A network destination's manifest: each acknowledged instance's line is
in the file as soon as it is written (a killed process loses none), the
series' writers sharing a session's file never tear each other's lines, and
a commit makes them durable."""

from __future__ import annotations

import threading

from dqr.manifest import ManifestAppender, held_instances


def _record(series: str, uid: str) -> dict:
    return {"SeriesInstanceUID": series, "SOPInstanceUID": uid, "replaced": {"PatientName": "x" * 200}}


def test_a_line_is_readable_before_the_commit_syncs_it(tmp_path):
    manifest = tmp_path / "session" / "manifest.jsonl"
    appender = ManifestAppender(manifest)
    appender.append([_record("1.2", "1.2.1")])
    assert held_instances(manifest, "1.2") == {"1.2.1"}  # what a rerun after kill -9 reads
    assert appender.sync() is True
    assert appender.sync() is False  # nothing appended since


def test_writers_sharing_a_manifest_keep_whole_lines(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    appenders = [ManifestAppender(manifest) for _ in range(4)]

    def write(number: int) -> None:
        for i in range(200):
            appenders[number].append([_record(f"1.{number}", f"1.{number}.{i}")])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for appender in appenders:
        appender.sync()
    assert all(held_instances(manifest, f"1.{n}") == {f"1.{n}.{i}" for i in range(200)} for n in range(4))
    assert len(manifest.read_text().splitlines()) == 800


def test_an_acknowledged_instance_s_line_is_its_record_as_json_whatever_the_pacs_sent(tmp_path):
    import json

    from dqr.model import Series, Study
    from dqr.plugins.destinations.common import AcknowledgedSeries

    manifest = tmp_path / "manifest.jsonl"
    odd = 'x"\\\n\u00e9'  # quotes, a backslash, a newline and a non-ASCII letter from a hostile peer
    series = AcknowledgedSeries(manifest, f"dest {odd}", Study(study_uid=f"1.2{odd}"), Series(study_uid=f"1.2{odd}", series_uid="1.2.3"))
    series.acknowledged([(f"1.2.3.{odd}", 12, {"PatientName": odd})], {f"1.2.3.{odd}": f"B000 {odd}"})
    series.acknowledged([("1.2.3.5", 14, {})])
    first, second = (json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines())
    assert first == {
        "destination": f"dest {odd}", "StudyInstanceUID": f"1.2{odd}", "SeriesInstanceUID": "1.2.3",
        "SOPInstanceUID": f"1.2.3.{odd}", "size": 12, "replaced": {"PatientName": odd},
        "stored": first["stored"], "warning": f"B000 {odd}",
    }
    assert second["SOPInstanceUID"] == "1.2.3.5" and second["replaced"] == {} and "warning" not in second
    assert held_instances(manifest, "1.2.3") == {f"1.2.3.{odd}", "1.2.3.5"}
