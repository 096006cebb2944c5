"""Spool files: each custom_id written once, torn lines cut, sealing into the file store."""

from __future__ import annotations

from pathlib import Path

from millrace.filestore import FileStore
from millrace.protocol import OutputLine
from millrace.records import BatchSealRequested, ResponseRecord
from millrace.results import Page, read_page, sealed_file_id, segments
from sink.assembler import Assembler


def record(custom_id: str, status: int = 200) -> ResponseRecord:
    return ResponseRecord(batch_id="batch_1", project="p", custom_id=custom_id,
                          id=f"id-{custom_id}", request_id="r", status_code=status,
                          body={"n": custom_id})


def seal(**fields: object) -> BatchSealRequested:
    return BatchSealRequested.model_validate({"batch_id": "batch_1", "project": "p", **fields})


def test_one_poll_s_records_of_several_batches_are_spooled_once(tmp_path: Path) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")))
    other = record("z").model_copy(update={"batch_id": "batch_2"})
    assert assembler.add([record("a"), record("a"), other, record("b", 400)]) == 3
    assert assembler.spool("batch_1").counts == {"output": 1, "errors": 1}
    assert assembler.spool("batch_2").counts == {"output": 1, "errors": 0}


def test_duplicates_are_written_once_even_after_a_restart(tmp_path: Path) -> None:
    files = FileStore(str(tmp_path / "files"))
    first = Assembler(tmp_path / "spool", files)
    assert first.add([record("a")]) == 1
    assert first.add([record("a")]) == 0
    assert first.add([record("b", 400)]) == 1
    # a new process (crash + restart) rebuilds the index from the spool
    second = Assembler(tmp_path / "spool", files)
    assert second.add([record("a")]) == 0
    assert second.add([record("b")]) == 0
    assert second.add([record("c")]) == 1
    second.seal_when_complete(seal(total=3))
    assert second.sealable() == ["batch_1"]
    sealed = second.seal("batch_1")
    output, errors = sealed.files["output"], sealed.files["errors"]
    assert output is not None and errors is not None
    assert output.id == sealed_file_id("batch_1", "output") and output.purpose == "batch_output"
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
    assert second.add([record("b")]) == 1
    lines = spool_file.read_bytes().splitlines()
    assert [OutputLine.model_validate_json(x).custom_id for x in lines] == ["a", "b"]


def test_not_sealable_until_every_line_is_written(tmp_path: Path) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")))
    assembler.add([record("a")])
    assembler.seal_when_complete(seal(total=2))
    assert assembler.sealable() == []
    assembler.add([record("b")])
    assert assembler.sealable() == ["batch_1"]


def test_sealed_batches_ignore_late_duplicates(tmp_path: Path) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")))
    assembler.add([record("a")])
    assembler.seal_when_complete(seal(total=1))
    sealed = assembler.seal("batch_1")
    assert sealed.files["errors"] is None  # an empty error file gets no id
    assembler.mark_sealed("batch_1")
    assert Assembler(tmp_path / "spool", assembler.files).add([record("a")]) == 0


def test_expiry_seals_once_counted_results_arrive_and_fills_the_rest(tmp_path: Path) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")))
    assembler.add([record("a")])
    # the aggregator had counted 2 results when the window passed: wait for the second
    assembler.seal_when_complete(seal(total=4, done=2, fill="batch_expired"))
    assert assembler.sealable() == []
    assembler.add([record("b", 400)])
    assert assembler.sealable() == ["batch_1"]
    spool = assembler.spool("batch_1")
    assert spool.fill(["a", "b", "c", "d"], "batch_expired", "too late") == 2
    sealed = assembler.seal("batch_1")
    assert sealed.counts == {"output": 1, "errors": 3}
    errors = [OutputLine.model_validate_json(x)
              for x in assembler.files.iter_lines("outputs/batch_1/errors.jsonl")]
    filled = [x for x in errors if x.error is not None]
    assert sorted(x.custom_id for x in filled) == ["c", "d"]
    assert all(x.response is None and x.error and x.error.code == "batch_expired"
               for x in filled)


def test_output_expires_after_stamps_sealed_files(tmp_path: Path) -> None:
    assembler = Assembler(tmp_path / "spool", FileStore(str(tmp_path / "files")))
    assembler.add([record("a")])
    assembler.seal_when_complete(seal(total=1, output_expires_after_s=7200))
    output = assembler.seal("batch_1").files["output"]
    assert output is not None and output.expires_at == output.created_at + 7200


def test_a_pending_seal_survives_a_restart(tmp_path: Path) -> None:
    files = FileStore(str(tmp_path / "files"))
    first = Assembler(tmp_path / "spool", files)
    first.add([record("a")])
    first.seal_when_complete(seal(total=2))  # its offset is committed; "b" is still coming
    assert first.sealable() == []
    restarted = Assembler(tmp_path / "spool", files)  # crash: nothing in memory survives
    assert restarted.sealable() == []
    restarted.add([record("b")])
    assert restarted.sealable() == ["batch_1"]
    restarted.seal("batch_1")
    restarted.mark_sealed("batch_1")
    assert Assembler(tmp_path / "spool", files).sealable() == []


def ids(page: Page) -> list[str]:
    return [OutputLine.model_validate_json(x).custom_id for x in page.lines]


def test_partial_results_page_through_segments_then_the_sealed_file(tmp_path: Path) -> None:
    files = FileStore(str(tmp_path / "files"))
    assembler = Assembler(tmp_path / "spool", files)
    for name in ("a", "b", "c"):
        assembler.add([record(name)])
    assembler.add([record("x", 400)])
    assert assembler.publish_due(0.0) == ["batch_1"]
    assert assembler.publish("batch_1") == 4
    assert assembler.publish_due(0.0) == []  # nothing new
    first = read_page(files, "batch_1", "output", 0, 2)
    assert ids(first) == ["a", "b"] and first.more and not first.sealed
    assert ids(read_page(files, "batch_1", "errors", 0, 10)) == ["x"]
    # a crash: the restarted sink knows what it published and publishes only what is new
    restarted = Assembler(tmp_path / "spool", files)
    restarted.add([record("d")])
    assert restarted.publish("batch_1") == 1
    assert [s[:2] for s in segments(files, "batch_1", "output")] == [(0, 3), (3, 4)]
    rest = read_page(files, "batch_1", "output", first.cursor(0), 10)
    assert ids(rest) == ["c", "d"] and not rest.more
    assert ids(read_page(files, "batch_1", "output", 4, 10)) == []
    # sealed: the same lines in the same order, so the cursor still holds; segments go
    restarted.seal_when_complete(seal(total=5))
    restarted.seal("batch_1")
    restarted.mark_sealed("batch_1")
    assert segments(files, "batch_1", "output") == []
    after_seal = read_page(files, "batch_1", "output", 2, 10)
    assert ids(after_seal) == ["c", "d"] and after_seal.sealed and not after_seal.more


def test_publishing_resumes_after_a_restart_with_nothing_new(tmp_path: Path) -> None:
    files = FileStore(str(tmp_path / "files"))
    first = Assembler(tmp_path / "spool", files)
    first.add([record("a")])
    first.publish("batch_1")
    restarted = Assembler(tmp_path / "spool", files)
    restarted.spool("batch_1")
    assert restarted.publish_due(0.0) == []
    assert ids(read_page(files, "batch_1", "output", 0, 10)) == ["a"]
