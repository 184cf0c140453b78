"""The image manifest read incrementally: appends since the last read, a torn tail, a file that shrank or was
replaced, and batch appends."""

import json
import os

from cdmbench.eval.generate import Manifest


def rec(i: int, version: int = 0) -> dict:
    return {"path": f"images/r/1/p{i}_s0.png", "version": version}


def test_read_sees_appends_since_the_last_read(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    assert m.read() == {}
    m.append_many([rec(0), rec(1)])
    assert set(m.read()) == {rec(0)["path"], rec(1)["path"]}
    other = Manifest(tmp_path / "manifest.jsonl")  # another process appends
    other.append(rec(2))
    other.append(rec(1, version=1))  # the last line of a path wins
    got = m.read()
    assert len(got) == 3 and got[rec(1)["path"]]["version"] == 1
    assert got == Manifest(tmp_path / "manifest.jsonl").read()  # the same as a fresh full read


def test_a_torn_tail_is_parsed_once_its_line_is_complete(tmp_path):
    path = tmp_path / "manifest.jsonl"
    m = Manifest(path)
    m.append(rec(0))
    line = json.dumps(rec(1))
    with open(path, "a") as f:
        f.write(line[:10])  # a write in progress
    assert set(m.read()) == {rec(0)["path"]}
    with open(path, "a") as f:
        f.write(line[10:] + "\n")
    assert set(m.read()) == {rec(0)["path"], rec(1)["path"]}


def test_a_damaged_line_warns_with_its_line_number(tmp_path, caplog):
    path = tmp_path / "manifest.jsonl"
    m = Manifest(path)
    m.append(rec(0))
    assert len(m.read()) == 1
    with open(path, "a") as f:
        f.write("{not json\n")
    m.append(rec(2))
    assert set(m.read()) == {rec(0)["path"], rec(2)["path"]}
    assert "ignoring 1 unreadable line(s) (line 2)" in caplog.text


def test_a_shrunk_or_replaced_file_is_read_again(tmp_path):
    path = tmp_path / "manifest.jsonl"
    m = Manifest(path)
    m.append_many([rec(0), rec(1), rec(2)])
    assert len(m.read()) == 3
    path.write_text(json.dumps(rec(5)) + "\n")  # shorter: read from the start
    assert set(m.read()) == {rec(5)["path"]}
    tmp = tmp_path / "new.jsonl"
    tmp.write_text("".join(json.dumps(rec(i)) + "\n" for i in (7, 8, 9, 10)))
    os.replace(tmp, path)  # another file (inode) in its place, longer than before
    assert set(m.read()) == {rec(i)["path"] for i in (7, 8, 9, 10)}
    path.unlink()
    assert m.read() == {}


def test_read_returns_a_copy(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    m.append(rec(0))
    m.read().clear()
    assert len(m.read()) == 1
