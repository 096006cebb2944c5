"""Result lines readable while a batch runs (segments) and after (the final file): a cursor
means the same in both, and a page never skips or repeats a line."""

from __future__ import annotations

from pathlib import Path

from millrace.filestore import FileStore
from millrace.result_files import (
    final_file_id,
    final_key,
    published_lines,
    read_page,
    segment_key,
    segments,
)

LINES = [f'{{"custom_id": "c{i}"}}'.encode() for i in range(25)]


def store(tmp_path: Path) -> FileStore:
    return FileStore(str(tmp_path / "files"))


def publish(files: FileStore, first: int, end: int) -> None:
    files.write_bytes(segment_key("b1", "output", first, end),
                      b"".join(line + b"\n" for line in LINES[first:end]))


def read_all(files: FileStore, limit: int) -> list[bytes]:
    found: list[bytes] = []
    while True:
        page = read_page(files, "b1", "output", len(found), limit)
        found += page.lines
        if not page.more:
            return found


def test_segments_are_read_in_line_order_by_cursor(tmp_path: Path) -> None:
    files = store(tmp_path)
    for first, end in ((10, 20), (0, 10), (20, 25)):  # written in any order
        publish(files, first, end)
    files.write_bytes("partial/b1/output/notes.txt", b"not a segment")
    assert [s[:2] for s in segments(files, "b1", "output")] == [(0, 10), (10, 20), (20, 25)]
    assert published_lines(files, "b1", "output") == 25
    for limit in (1, 3, 10, 100):
        assert read_all(files, limit) == LINES
    page = read_page(files, "b1", "output", 7, 5)
    assert (page.lines, page.final, page.more) == (LINES[7:12], False, True)
    assert page.cursor(7) == 12


def test_the_final_file_answers_the_same_cursor(tmp_path: Path) -> None:
    files = store(tmp_path)
    publish(files, 0, 10)
    before = read_page(files, "b1", "output", 4, 3)
    files.write_bytes(final_key("b1", "output"), b"".join(line + b"\n" for line in LINES))
    after = read_page(files, "b1", "output", 4, 3)
    assert before.lines == after.lines == LINES[4:7]
    assert after.final and not before.final
    assert read_all(files, 4) == LINES
    end = read_page(files, "b1", "output", 25, 10)
    assert (end.lines, end.more) == ([], False)


def test_no_results_yet_is_an_empty_page(tmp_path: Path) -> None:
    page = read_page(store(tmp_path), "b1", "errors", 0, 10)
    assert (page.lines, page.final, page.more) == ([], False, False)


def test_final_file_ids_are_the_same_when_written_again() -> None:
    assert final_file_id("b1", "output") == final_file_id("b1", "output")
    assert final_file_id("b1", "output") != final_file_id("b1", "errors")
    assert final_file_id("b1", "output").startswith("file-")
