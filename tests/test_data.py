import json

import pytest

from loraflow.data import DataError, read_jsonl, validate_splits

GOOD = {"instruction": "Extract.", "input": "text", "output": "{}"}


def splits(tmp_path, train_bytes: bytes):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.jsonl").write_bytes(train_bytes)
    for name in ("validation", "test"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(GOOD) + "\n")
    return {s: tmp_path / f"{s}.jsonl" for s in ("train", "validation", "test")}


def test_valid_splits_are_counted_and_written_out(tmp_path):
    files = splits(tmp_path, (json.dumps(GOOD) + "\n").encode() * 3)
    report = validate_splits(files, tmp_path / "out")
    assert report.counts == {"train": 3, "validation": 1, "test": 1}
    assert [e.output for e in read_jsonl(tmp_path / "out" / "train.jsonl")] == ["{}"] * 3


def test_bom_crlf_blank_lines_and_extra_keys_are_tolerated(tmp_path):
    line = json.dumps(GOOD | {"source": "web"}).encode()
    files = splits(tmp_path, b"\xef\xbb\xbf" + line + b"\r\n\r\n" + line + b"\r\n")
    report = validate_splits(files, tmp_path / "out")
    assert report.counts["train"] == 2 and report.blank_lines == 1


def test_content_hash_changes_with_one_byte_but_not_with_the_path(tmp_path):
    a = validate_splits(splits(tmp_path / "a", (json.dumps(GOOD) + "\n").encode()), tmp_path / "o")
    b = validate_splits(splits(tmp_path / "b", (json.dumps(GOOD) + "\n").encode()), tmp_path / "o")
    changed = json.dumps(GOOD | {"output": "{ }"}) + "\n"
    c = validate_splits(splits(tmp_path / "c", changed.encode()), tmp_path / "o")
    assert a.sha256 == b.sha256 != c.sha256


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"{not json", "train.jsonl:2: not JSON"),
        (b"[1, 2]", "train.jsonl:2: expected a JSON object, found list"),
        (b'{"instruction": "x", "input": ""}', "train.jsonl:2: missing field 'output'"),
        (b'{"instruction": "x", "input": "", "output": 5}', "field 'output' must be a string"),
        (b'{"instruction": " ", "input": "", "output": "y"}', "field 'instruction' is empty"),
        (b'{"instruction": "\xff", "input": "", "output": "y"}', "not valid UTF-8"),
    ],
)
def test_each_bad_line_is_reported_with_file_and_line(tmp_path, line, expected):
    files = splits(tmp_path, (json.dumps(GOOD) + "\n").encode() + line + b"\n")
    with pytest.raises(DataError) as err:
        validate_splits(files, tmp_path / "out")
    assert expected in str(err.value)
    assert '"instruction"' in str(err.value)  # says what a line should look like


def test_all_bad_lines_are_listed_together(tmp_path):
    files = splits(tmp_path, b"oops\n" + (json.dumps(GOOD) + "\n").encode() + b"[]\n")
    with pytest.raises(DataError) as err:
        validate_splits(files, tmp_path / "out")
    assert "2 problem(s)" in str(err.value)
    assert "train.jsonl:1:" in str(err.value) and "train.jsonl:3:" in str(err.value)


def test_missing_and_empty_files_fail_clearly(tmp_path):
    files = splits(tmp_path, b"")
    with pytest.raises(DataError, match="no examples"):
        validate_splits(files, tmp_path / "out")
    files["test"] = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match="absent.jsonl does not exist"):
        validate_splits(files, tmp_path / "out")
