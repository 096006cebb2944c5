"""Spool files: each custom_id written once, torn lines cut, counts and usage as the files
hold them, final files written once every line is in."""

from __future__ import annotations

from pathlib import Path

import pytest

from millrace.filestore import FileStore
from millrace.protocol import OutputLine
from millrace.records import BatchFilesReady, ResponseRecord, SpooledResponse, read_response
from millrace.result_files import Page, final_file_id, final_key, read_page, segments
from sink.assembler import Assembler


def record(custom_id: str, status: int = 200, line: int | None = None,
           batch_id: str = "batch_1") -> SpooledResponse:
    """A response record as a worker produces it, read as the sink reads it."""
    body: dict[str, object] = {"n": custom_id}
    if status == 200:
        body["usage"] = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                         "prompt_tokens_details": {"cached_tokens": 1}}
    return read_response(ResponseRecord(
        batch_id=batch_id, project="p", custom_id=custom_id, line=line, id=f"id-{custom_id}",
        request_id="r", status_code=status, body=body).dumps())


def ready(lines: int) -> BatchFilesReady:
    return BatchFilesReady(batch_id="batch_1", output_file_id=None, error_file_id=None,
                           lines=lines)


def test_one_poll_s_records_of_several_batches_are_spooled_once(tmp_path: Path) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")))
    other = record("z", line=9, batch_id="batch_2")
    added = assembler.add([record("a", line=1), record("a", line=1), other,
                           record("b", 400, line=2)])
    assert added == {"batch_1": [1, 2], "batch_2": [9]}
    assert assembler.spool("batch_1").counts == {"output": 1, "errors": 1}
    assert assembler.spool("batch_2").counts == {"output": 1, "errors": 0}
    assert assembler.spool("batch_1").meta.project == "p"


def test_counts_and_usage_are_what_the_files_hold_even_after_a_restart(tmp_path: Path) -> None:
    files = FileStore(str(tmp_path / "files"))
    first = Assembler(tmp_path / "spool", files)
    assert first.add([record("a")]) == {"batch_1": []}
    assert first.add([record("a")]) == {}
    assert first.add([record("b", 400)]) == {"batch_1": []}
    progress = first.spool("batch_1").progress()
    assert (progress.completed, progress.failed) == (1, 1)
    # errors carry none
    assert (progress.input_tokens, progress.output_tokens, progress.cached_tokens) == (2, 3, 1)
    # a new process (crash + restart) rebuilds index, counts and usage from the spool
    second = Assembler(tmp_path / "spool", files)
    assert second.add([record("a"), record("b")]) == {}
    assert second.spool("batch_1").progress() == progress.model_copy(
        update={"at": second.spool("batch_1").progress().at})
    assert second.add([record("c")]) == {"batch_1": []}
    second.learn("batch_1", total=3)
    assert second.complete() == ["batch_1"]
    written = second.write_files("batch_1")
    output, errors = written.files["output"], written.files["errors"]
    assert output is not None and errors is not None
    assert output.id == final_file_id("batch_1", "output") and output.purpose == "batch_output"
    assert written.counts == {"output": 2, "errors": 1} and written.tokens == (4, 6, 2, 0)
    out_lines = [OutputLine.model_validate_json(x)
                 for x in files.iter_lines("outputs/batch_1/output.jsonl")]
    err_lines = [OutputLine.model_validate_json(x)
                 for x in files.iter_lines("outputs/batch_1/errors.jsonl")]
    assert sorted(x.custom_id for x in out_lines) == ["a", "c"]
    assert [x.custom_id for x in err_lines] == ["b"]
    assert output.bytes == (tmp_path / "files/outputs/batch_1/output.jsonl").stat().st_size


def test_a_torn_last_line_is_cut_and_rewritten(tmp_path: Path) -> None:
    files = FileStore(str(tmp_path / "files"))
    first = Assembler(tmp_path / "spool", files)
    first.add([record("a")])
    spool_file = tmp_path / "spool/batch_1/output.jsonl"
    with spool_file.open("ab") as f:
        f.write(b'{"id": "id-b", "custom_id": "b", "resp')  # crash mid-write
    second = Assembler(tmp_path / "spool", files)
    assert second.add([record("b")]) == {"batch_1": []}
    lines = spool_file.read_bytes().splitlines()
    assert [OutputLine.model_validate_json(x).custom_id for x in lines] == ["a", "b"]
    assert second.spool("batch_1").counts["output"] == 2


def test_not_complete_until_every_line_is_in_and_the_total_known(tmp_path: Path) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")))
    assembler.add([record("a"), record("b")])
    assert assembler.complete() == []  # how many lines the batch has is not known yet
    assembler.learn("batch_1", total=3)
    assert assembler.complete() == []
    assembler.add([record("c")])
    assert assembler.complete() == ["batch_1"]


def test_written_batches_ignore_late_lines_and_keep_their_announcement(tmp_path: Path) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")))
    assembler.add([record("a")])
    assembler.learn("batch_1", total=1)
    written = assembler.write_files("batch_1")
    assert written.files["errors"] is None  # an empty error file gets no id
    assembler.mark_written("batch_1", ready(1))
    restarted = Assembler(tmp_path / "spool", assembler.files)
    assert restarted.add([record("a"), record("late")]) == {}
    assert restarted.complete() == []
    assert restarted.spool("batch_1").files_ready() == ready(1)


def test_output_expires_after_stamps_the_files(tmp_path: Path) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")))
    assembler.add([record("a")])
    assembler.learn("batch_1", total=1, output_expires_after_s=7200)
    output = assembler.write_files("batch_1").files["output"]
    assert output is not None and output.expires_at == output.created_at + 7200


@pytest.mark.parametrize(("retention", "given", "after"), [
    (30 * 86400, None, 30 * 86400),  # OpenAI's default: 30 days after the batch ends
    (30 * 86400, 3600, 3600),  # the batch's own output_expires_after wins
    (0, None, None),  # retention off: kept until deleted
])
def test_retention_stamps_files_the_batch_gave_no_expiry(
        tmp_path: Path, retention: int, given: int | None, after: int | None) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")), retention)
    assembler.add([record("a")])
    assembler.learn("batch_1", total=1, output_expires_after_s=given)
    output = assembler.write_files("batch_1").files["output"]
    assert output is not None
    assert output.expires_at == (None if after is None else output.created_at + after)


def test_what_was_learnt_survives_a_restart(tmp_path: Path) -> None:
    files = FileStore(str(tmp_path / "files"))
    first = Assembler(tmp_path / "spool", files)
    first.add([record("a")])
    first.learn("batch_1", total=2)  # its offset is committed; "b" is still coming
    restarted = Assembler(tmp_path / "spool", files)  # crash: nothing in memory survives
    assert restarted.complete() == []
    restarted.add([record("b")])
    assert restarted.complete() == ["batch_1"]
    restarted.write_files("batch_1")
    restarted.mark_written("batch_1", ready(2))
    assert Assembler(tmp_path / "spool", files).complete() == []


def test_a_finished_batch_without_lines_leaves_nothing_behind(tmp_path: Path) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")))
    assembler.learn("batch_1", project="p", output_expires_after_s=3600)  # then it failed
    assembler.forget("batch_1")
    assert not (tmp_path / "spool/batch_1").exists()
    assert Assembler(tmp_path / "spool", assembler.files).complete() == []


def ids(page: Page) -> list[str]:
    return [OutputLine.model_validate_json(x).custom_id for x in page.lines]


def test_partial_results_page_through_segments_then_the_final_file(tmp_path: Path) -> None:
    files = FileStore(str(tmp_path / "files"))
    assembler = Assembler(tmp_path / "spool", files)
    for name in ("a", "b", "c"):
        assembler.add([record(name)])
    assembler.add([record("x", 400)])
    assert assembler.publish_due(0.0) == ["batch_1"]
    assert assembler.publish("batch_1") == 4
    assert assembler.publish_due(0.0) == []  # nothing new
    first = read_page(files, "batch_1", "output", 0, 2)
    assert ids(first) == ["a", "b"] and first.more and not first.final
    assert ids(read_page(files, "batch_1", "errors", 0, 10)) == ["x"]
    # a crash: the restarted sink knows what it published and publishes only what is new
    restarted = Assembler(tmp_path / "spool", files)
    restarted.add([record("d")])
    assert restarted.publish("batch_1") == 1
    assert [s[:2] for s in segments(files, "batch_1", "output")] == [(0, 3), (3, 4)]
    rest = read_page(files, "batch_1", "output", first.cursor(0), 10)
    assert ids(rest) == ["c", "d"] and not rest.more
    assert ids(read_page(files, "batch_1", "output", 4, 10)) == []
    # written: the same lines in the same order, so the cursor still holds; segments go
    restarted.learn("batch_1", total=5)
    restarted.write_files("batch_1")
    restarted.mark_written("batch_1", ready(5))
    assert segments(files, "batch_1", "output") == []
    after = read_page(files, "batch_1", "output", 2, 10)
    assert ids(after) == ["c", "d"] and after.final and not after.more


def test_publishing_resumes_after_a_restart_with_nothing_new(tmp_path: Path) -> None:
    files = FileStore(str(tmp_path / "files"))
    first = Assembler(tmp_path / "spool", files)
    first.add([record("a")])
    first.publish("batch_1")
    restarted = Assembler(tmp_path / "spool", files)
    restarted.spool("batch_1")
    assert restarted.publish_due(0.0) == []
    assert ids(read_page(files, "batch_1", "output", 0, 10)) == ["a"]


def test_a_sink_that_takes_a_batch_over_copies_in_what_the_other_published(
        tmp_path: Path) -> None:
    """Two sinks, each its own disk, one file store: the first publishes everything it
    spooled when it gives its partitions up; the second needs no Kafka record of those
    lines to complete the batch, and the files come out in the first sink's order."""
    files = FileStore(str(tmp_path / "files"))
    first = Assembler(tmp_path / "host-1", files)
    first.add([record("a"), record("b", 400), record("c")])
    first.spool("batch_1")  # published on the partial cadence: nothing yet
    first.publish_all()  # its partitions are revoked
    assert [(a, b) for a, b, _ in segments(files, "batch_1", "output")] == [(0, 2)]
    second = Assembler(tmp_path / "host-2", files)
    assert second.add([record("c"), record("d")]) == {"batch_1": []}  # c was copied in
    spool = second.spool("batch_1")
    assert spool.counts == {"output": 3, "errors": 1}
    assert spool.progress().input_tokens == 6
    second.learn("batch_1", total=4)
    assert second.complete() == ["batch_1"]
    written = second.write_files("batch_1")
    output = written.files["output"]
    assert output is not None
    lines = [OutputLine.model_validate_json(x).custom_id
             for x in files.read_bytes(final_key("batch_1", "output")).splitlines()]
    assert lines == ["a", "c", "d"]
    # only what follows the copied lines is published from the second sink
    second.publish("batch_1")
    assert [(a, b) for a, b, _ in segments(files, "batch_1", "output")] == [(0, 2), (2, 3)]
