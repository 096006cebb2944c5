"""Readiness markers: what a process writes once it can work, what the launcher, operators
and the chaos tools read back (pids, partitions), replicas included."""

from __future__ import annotations

import os
from pathlib import Path

from millrace import readiness
from millrace.settings import Settings


def test_a_marker_names_its_process_and_the_partitions_it_holds(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert readiness.read(settings, "sink") is None
    readiness.note_partitions(settings, "sink", "p.responses", [1])  # not ready: nothing
    assert readiness.read(settings, "sink") is None
    readiness.mark_ready(settings, "sink", models={"m": None})
    readiness.note_partitions(settings, "sink", "p.responses", [3, 1])
    readiness.note_partitions(settings, "sink", "p.batch-events", [1])
    assert readiness.read(settings, "sink") == {
        "pid": os.getpid(), "models": {"m": None},
        "partitions": {"p.responses": [1, 3], "p.batch-events": [1]}}
    assert list(settings.run_dir.glob("*.tmp")) == []  # written whole, then renamed
    readiness.clear(settings, "sink")
    assert readiness.read(settings, "sink") is None


def test_another_process_s_marker_is_not_changed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    settings.run_dir.mkdir(parents=True)
    readiness.marker(settings, "sink").write_text('{"pid": 1}')
    readiness.note_partitions(settings, "sink", "p.responses", [0])
    assert readiness.read(settings, "sink") == {"pid": 1}


def test_pids_of_a_deployment_and_its_replicas(tmp_path: Path) -> None:
    readiness.mark_ready(Settings(data_dir=tmp_path), "gateway")
    replica = Settings(data_dir=readiness.instance_dir(tmp_path, "sink-2"))
    readiness.mark_ready(replica, "sink-2")
    (tmp_path / "run" / "broken.ready").write_text("{not json")
    assert readiness.pids(tmp_path) == {"gateway": os.getpid(), "sink-2": os.getpid()}
