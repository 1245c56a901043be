"""tirl.data.jsonl: the one JSON-lines reader/writer (sources, pipeline progress, evaluation caches, BFCL files)."""

from __future__ import annotations

import pytest

from tirl.data.jsonl import BadLine, JsonlAppender, JsonlError, read_jsonl, scan_jsonl, write_jsonl
from tirl.errors import UserError


def test_round_trip_keeps_order_unicode_and_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"q": "√2 ≈ 1.41"}, [1, 2], "x"])
    path.write_text(path.read_text() + "\n")                  # a blank line is skipped, numbers stay the file's
    with JsonlAppender(path) as out:
        out.append({"id": 4})
    assert list(read_jsonl(path)) == [(1, {"q": "√2 ≈ 1.41"}), (2, [1, 2]), (3, "x"), (5, {"id": 4})]
    assert not list(tmp_path.glob(".a.jsonl.tmp-*"))         # the atomic write left no temporary file


def test_bad_line_names_file_and_line_in_the_callers_error(tmp_path):
    class DomainError(UserError):
        pass

    path = tmp_path / "b.jsonl"
    path.write_text('{"id": 1}\n{"id": 2,,}\n{"id": 3}\n')
    with pytest.raises(DomainError, match=r"b\.jsonl:2: not valid JSON .*; fix or remove that line\.$"):
        list(read_jsonl(path, error=DomainError))
    with pytest.raises(JsonlError):                           # a mid-file bad line is never a torn tail
        list(read_jsonl(path, torn_tail_ok=True))
    lines = list(scan_jsonl(path))                            # the per-line view never raises
    assert [n for n, v in lines] == [1, 2, 3] and isinstance(lines[1][1], BadLine) and not lines[1][1].torn


def test_only_a_torn_last_line_is_forgiven(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 1}\n{"id": 2, "reco')             # a killed append: no newline at the end
    assert list(read_jsonl(path, torn_tail_ok=True)) == [(1, {"id": 1})]
    with pytest.raises(JsonlError, match="c.jsonl:2"):
        list(read_jsonl(path))
