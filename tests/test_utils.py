"""The foundation's one JSON reader: every package file read through it fails in one line
that names the file, the line and what is wrong."""

import pytest

from llmscratch.errors import UserError
from llmscratch.utils import parse_json, read_json, read_text


@pytest.mark.parametrize("content,expect,message", [
    ('{"a": 1,\n "b": }', dict, "f.json:2: malformed JSON (Expecting value at column 7)"),
    ("[1, 2]", dict, "f.json: expected a JSON object, got list"),
    ('{"a": 1}', list, "f.json: expected a JSON array, got dict"),
    ("[" * 100_000 + "]" * 100_000, None, "f.json:1: JSON nested too deeply to read"),
])
def test_read_json_names_the_file_line_and_fault(tmp_path, content, expect, message):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(UserError) as e:
        read_json(path, expect)
    assert str(e.value) == f"{tmp_path}/{message}"


def test_read_json_reads_what_is_valid(tmp_path):
    path = tmp_path / "f.json"
    path.write_text('{"x": [1, "é"]}', encoding="utf-8")
    assert read_json(path) == {"x": [1, "é"]}
    assert read_json(path, expect=None) == {"x": [1, "é"]}
    path.write_text("[3]")
    assert read_json(path, expect=list) == [3]


def test_a_record_of_a_jsonl_file_reports_its_own_line():
    with pytest.raises(UserError, match=r"^d.jsonl:7: malformed JSON \(Expecting"):
        parse_json('{"a": }', "d.jsonl", dict, line=7)
    with pytest.raises(UserError, match=r"^d.jsonl:7: expected a JSON object, got int$"):
        parse_json("5", "d.jsonl", dict, line=7)


def test_read_text_errors(tmp_path):
    with pytest.raises(UserError, match="nope.txt: no such file"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="is a folder, expected a file"):
        read_text(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text \(unexpected end of data at byte 3\)"):
        read_text(tmp_path / "latin1.txt")
