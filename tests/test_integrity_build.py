"""Issue 18, items 6 and 7 on the data side: each misuse of `vpmoe data build` is one UserError (exit 2) or RunError
(exit 1) naming the path and what to do, and a build stopped by one resumes to the bytes of an uninterrupted one."""

import errno
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vpmoe import config
from vpmoe.data import indexed, synthetic
from vpmoe.data.build import BuildConfig, DataSection, build
from vpmoe.errors import RunError, UserError

FILES = [f"{s}/{n}.{e}" for s in ("train", "valid") for n in ("tokens", "spans") for e in ("bin", "idx")]


def section(tmp_path, inputs, out="ds", **kw):
    return DataSection(inputs=[str(p) for p in inputs], format="synth", out=str(tmp_path / out), seq_len=512,
                       valid_fraction=0.25, **kw)


def same_dataset(a, b):
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in FILES)
    files = [json.loads((d / "manifest.json").read_text())["files"] for d in (a, b)]
    assert files[0] == files[1]


@pytest.fixture
def inputs(tmp_path):
    return synthetic.write_corpus(tmp_path / "src", 60, shards=3, seed=5)


def test_output_paths_that_cannot_be_written(tmp_path, inputs, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"data.out {tmp_path / 'file' / 'ds'}: {tmp_path / 'file'} is a file, not a "
                                        f"directory"):
        build(section(tmp_path, inputs, out="file/ds"))
    with pytest.raises(UserError, match=f"data.out {tmp_path / 'file'} is a file: set data.out to a new directory"):
        build(section(tmp_path, inputs, out="file"))
    with pytest.raises(UserError, match=r"cannot create /proc/vpmoe-test\.partial \(No such file or directory\): set "
                                        r"data.out to a directory you can write to"):
        build(DataSection(inputs=[str(p) for p in inputs], format="synth", out="/proc/vpmoe-test"))

    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):  # the tests may run as root, for whom no directory is read-only
        if self.name.endswith(".partial"):
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    with pytest.raises(UserError, match=r"cannot create .*ds\.partial \(Read-only file system\)"):
        build(section(tmp_path, inputs))


@pytest.mark.parametrize("where", ["shard", "merge"])
def test_a_full_disk_stops_the_build_and_it_resumes_once_there_is_room(tmp_path, inputs, monkeypatch, where):
    reference = build(section(tmp_path, inputs, out="reference"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "shard":
        monkeypatch.setattr(np, "save", full)  # a shard's sample lengths
    else:
        monkeypatch.setattr(indexed, "_append", full)
    with pytest.raises(RunError, match=f"no space left for the build in {tmp_path / 'ds.partial'}: free some space on "
                                       f"that device and run the same command to resume"):
        build(section(tmp_path, inputs))
    monkeypatch.undo()
    same_dataset(build(section(tmp_path, inputs)), reference)
    assert not (tmp_path / "ds.partial").exists()


def test_a_damaged_plan_is_refused_naming_it(tmp_path, inputs):
    for name, text in (("plan.json", '{"version": 2, "conf'), ("plan.json", "[1, 2]")):
        partial = tmp_path / "ds.partial"
        (partial / "shards").mkdir(parents=True, exist_ok=True)
        (partial / name).write_text(text)
        with pytest.raises(UserError, match=f"cannot resume the build in {partial}: {partial / name} is damaged. "
                                            f"Remove {partial} to start over"):
            build(section(tmp_path, inputs))


def test_a_damaged_parquet_page_names_the_file_and_row_group(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(synthetic.records(40, seed=2)), path, row_group_size=20)
    column = pq.ParquetFile(path).metadata.row_group(1).column(2)  # row group 1, the "query" column
    raw = bytearray(path.read_bytes())
    raw[column.data_page_offset : column.data_page_offset + 64] = b"\xab" * 64  # its page header
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        build(section(tmp_path, [path]))
    assert f"{path}: row group 1 (rows 21-40) cannot be read (" in str(e.value) and "\n" not in str(e.value)


def test_empty_inputs_warn_and_an_empty_build_is_refused(tmp_path, inputs, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    ds = build(section(tmp_path, [inputs[0], tmp_path / "empty.jsonl"]))
    assert f"warning: {tmp_path / 'empty.jsonl'} holds no records" in capsys.readouterr().err
    assert json.loads((ds / "manifest.json").read_text())["inputs"][1]["records"] == 0

    (tmp_path / "empty2.jsonl").write_text("")
    with pytest.raises(UserError, match=r"nothing to build: the 2 input file\(s\) hold 0 records, 0 accepted: check "
                                        r"data.inputs and data.format \(nothing was written\)"):
        build(section(tmp_path, [tmp_path / "empty.jsonl", tmp_path / "empty2.jsonl"], out="empty"))
    assert not (tmp_path / "empty").exists() and not (tmp_path / "empty.partial").exists()


def test_json_errors_read_as_one_sentence(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"synth_id": "x1", "query": "unterminated\n')
    with pytest.raises(UserError) as e:
        build(section(tmp_path, [bad]))
    assert f"{bad}:1: not valid JSON (Invalid control character at column 42)" in str(e.value)
    assert "at at" not in str(e.value)


def test_a_schema_error_says_where_the_partial_build_is_and_the_fixed_file_resumes(tmp_path, inputs, capsys):
    reference = build(section(tmp_path, inputs, out="reference"))
    good = inputs[1].read_bytes()
    inputs[1].write_bytes(good + b'{"synth_id": "x1"}\n')
    partial = tmp_path / "ds.partial"
    with pytest.raises(UserError) as e:
        build(section(tmp_path, inputs))
    assert str(e.value).startswith(f"{inputs[1]}:21: record 'x1': missing required field")
    assert str(e.value).endswith(f"The build stopped; {partial} keeps the 1 of 3 input files rendered so far: fix "
                                 f"the input and run the same command to resume, or remove {partial}")

    inputs[1].write_bytes(good)  # fixed
    capsys.readouterr()
    same_dataset(build(section(tmp_path, inputs)), reference)
    assert f"resuming the build in {partial}" in capsys.readouterr().out


def test_a_schema_error_does_not_excuse_other_changed_files(tmp_path, inputs):
    inputs[1].write_bytes(inputs[1].read_bytes() + b"[1]\n")
    with pytest.raises(UserError):
        build(section(tmp_path, inputs))
    inputs[2].write_bytes(inputs[2].read_bytes() + b"\n")  # not the file that failed, and not rendered yet
    with pytest.raises(UserError, match=r"input files changed: \['[^']*synth_002.jsonl'\]"):
        build(section(tmp_path, inputs))


def test_an_input_that_is_a_directory(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(UserError, match=f"data.inputs: '{tmp_path / 'corpus'}' is a directory; name its files"):
        build(section(tmp_path, [tmp_path / "corpus"]))


def test_set_errors_name_the_override_and_file_errors_the_file(tmp_path, inputs):
    cfg = tmp_path / "build.toml"
    cfg.write_text(f'[data]\ninputs = ["{inputs[0]}"]\nformat = "synth"\nout = "x"\n')
    cases = [
        (["data.colour=1"], "--set 'data.colour=1': unknown key 'data.colour'"),
        (["data.pack=3"], "--set 'data.pack=3': 'data.pack' must be bool, got int 3"),
        (["data.inputs=[3]"], "--set 'data.inputs=[3]': 'data.inputs[0]' must be str, got int 3"),
        (["extra.key=1"], "--set 'extra.key=1': unknown key 'extra'"),
        (["data.seq_len=10"], f"{cfg} with --set data.seq_len=10: 'data.seq_len' must be at least 128, got 10"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError) as e:
            config.load(str(cfg), BuildConfig, overrides, kind="data")
        assert str(e.value) == message
    cfg.write_text(cfg.read_text() + "pack = 3\n")  # the file's own mistake, with an unrelated override
    with pytest.raises(UserError) as e:
        config.load(str(cfg), BuildConfig, ["data.seq_len=256"], kind="data")
    assert str(e.value) == f"{cfg}: 'data.pack' must be bool, got int 3"


def test_the_manifest_records_every_dataset_file(tmp_path, inputs):
    ds = build(section(tmp_path, inputs))
    files = json.loads((ds / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(FILES)
    written = [p.relative_to(ds).as_posix() for p in ds.rglob("*") if p.is_file()]
    assert sorted(written) == sorted(FILES + ["manifest.json"])  # no lock file, no plan, no shards
