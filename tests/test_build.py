import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vpmoe import tokenizer as tk
from vpmoe.data import build as build_module
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.data.harmony import HarmonyRenderer, split_of
from vpmoe.data.indexed import IndexedReader
from vpmoe.errors import UserError
from vpmoe.artifacts.files import file_sha256


def section(tmp_path, inputs, **kw):
    defaults = dict(format="synth", out=str(tmp_path / "ds"), seq_len=512, valid_fraction=0.25)
    return DataSection(inputs=[str(p) for p in inputs], **{**defaults, **kw})


def read_split(ds, split):
    return IndexedReader(ds / split / "tokens"), IndexedReader(ds / split / "spans")


def test_unpacked_build_is_the_rendered_records_split_by_id_hash(tmp_path):
    rows = synthetic.records(120, seed=1)
    rows[5]["query"] = " "
    rows[9]["synthetic_answer"] = "long answer " * 400
    src = synthetic.write_jsonl(tmp_path / "a.jsonl", rows)
    ds = build(section(tmp_path, [src]))
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["records"] == {"read": 120, "accepted": 118, "rejected": 2}
    assert manifest["rejects"]["empty_query"] == {"count": 1, "examples": [rows[5]["synth_id"]]}
    assert manifest["rejects"]["final_too_long"]["examples"] == [rows[9]["synth_id"]]
    renderer = HarmonyRenderer("medium")
    kept = [r for i, r in enumerate(rows) if i not in (5, 9)]
    for split in ("train", "valid"):
        expected = [r for r in kept if split_of(r["synth_id"], 0.25) == split]
        tokens, spans = read_split(ds, split)
        assert len(tokens) == len(expected) == manifest["splits"][split]["samples"]
        for i, r in enumerate(expected):
            ref = renderer.render(r["query"], r["synthetic_reasoning"], r["synthetic_answer"], 512)
            assert np.array_equal(tokens[i], ref.tokens) and np.array_equal(spans[i], ref.spans)
        counts = np.bincount(np.concatenate([spans[i] for i in range(len(spans))]), minlength=3)
        assert list(manifest["splits"][split]["span_tokens"].values()) == counts.tolist()
    assert manifest["inputs"][0] == {"name": src.name, "sha256": file_sha256(src), "records": 120}
    assert manifest["provenance"]["tokenizer_sha256"] == tk.O200K_SHA256
    assert not (tmp_path / "ds.partial").exists()


def test_packed_build_joins_whole_conversations_with_eod(tmp_path):
    inputs = synthetic.write_corpus(tmp_path / "src", 200, shards=3, seed=2)
    unpacked = build(section(tmp_path, inputs, valid_fraction=0.0))
    packed = build(section(tmp_path, inputs, valid_fraction=0.0, pack=True, out=str(tmp_path / "packed")))
    docs_tokens, docs_spans = read_split(unpacked, "train")
    tokens, spans = read_split(packed, "train")
    assert len(tokens) < len(docs_tokens)
    rebuilt = []
    for i in range(len(tokens)):
        assert len(tokens[i]) <= 512
        cuts = np.flatnonzero(tokens[i] == tk.EOD)
        assert np.all(spans[i][cuts] == 0)
        rebuilt += np.split(tokens[i], cuts)
    rebuilt = [d[1:] if d[0] == tk.EOD else d for d in rebuilt]
    assert len(rebuilt) == len(docs_tokens)
    assert all(np.array_equal(a, docs_tokens[j]) for j, a in enumerate(rebuilt))


def test_parquet_and_text_inputs(tmp_path):
    rows = synthetic.records(30, seed=4)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    ds = build(section(tmp_path, [tmp_path / "a.parquet"], valid_fraction=0.0))
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["records"]["accepted"] == 30
    assert manifest["inputs"][0]["sha256"] == file_sha256(tmp_path / "a.parquet")

    text = [{"id": f"t{i}", "text": "Healing text. " * (20 + 60 * i)} for i in range(4)]
    src = synthetic.write_jsonl(tmp_path / "t.jsonl", text)
    ds = build(section(tmp_path, [src], format="text", seq_len=256, valid_fraction=0.0, out=str(tmp_path / "t")))
    tokens, spans = read_split(ds, "train")
    total = sum(len(tk.encode(r["text"])) for r in text)
    assert sum(len(tokens[i]) for i in range(len(tokens))) == total
    for i in range(len(spans)):
        assert spans[i][0] == 0 and np.all(spans[i][1:] == 2)
    chunked = sum(len(tk.encode(r["text"])) > 256 for r in text)
    assert chunked >= 1
    assert json.loads((ds / "manifest.json").read_text())["truncated"]["chunked"] == chunked


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    inputs = synthetic.write_corpus(tmp_path / "src", 300, shards=4, seed=5)
    one = build(section(tmp_path, inputs, pack=True, out=str(tmp_path / "one")))
    two = build(section(tmp_path, inputs, pack=True, out=str(tmp_path / "two"), workers=2))
    for split in ("train", "valid"):
        for name in ("tokens.bin", "tokens.idx", "spans.bin", "spans.idx"):
            assert (one / split / name).read_bytes() == (two / split / name).read_bytes()
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (one, two)]
    assert manifests[0]["inputs"] == manifests[1]["inputs"]
    assert [e["sha256"] for e in manifests[1]["inputs"]] == [file_sha256(p) for p in inputs]


def test_a_worker_error_stops_a_parallel_build(tmp_path):
    inputs = synthetic.write_corpus(tmp_path / "src", 40, shards=4, seed=7)
    with open(inputs[2], "ab") as f:
        f.write(b'{"synth_id": "x1", "query": "q"\n')
    with pytest.raises(UserError, match=r"synth_002.jsonl:11: not valid JSON"):
        build(section(tmp_path, inputs, workers=2))
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("line, message", [
    (b'{"synth_id": "x1", "query": "q", "synthetic_reasoning": "r", "language": "en", "exercise": null}',
     "record 'x1': missing required field 'synthetic_answer'"),
    (b'{"synth_id": "x1", "query": 3, "synthetic_reasoning": "r", "synthetic_answer": "a", "language": "en", '
     b'"exercise": null}', "record 'x1': field 'query' must be str, got int"),
    (b'{"synth_id": "x1", "query": "q"', "not valid JSON"),
    (b'\xff\xfe garbage', "not valid UTF-8"),
    (b'[1, 2]', "must be a JSON object"),
])
def test_schema_errors_stop_the_build_naming_file_line_and_id(tmp_path, line, message):
    good = synthetic.records(3, seed=6)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in good) + line + b"\n")
    with pytest.raises(UserError) as e:
        build(section(tmp_path, [path]))
    assert f"{path}:4" in str(e.value) and message in str(e.value)
    assert not (tmp_path / "ds").exists()


def test_duplicate_ids_within_and_across_files(tmp_path):
    rows = synthetic.records(4, seed=8)
    a = synthetic.write_jsonl(tmp_path / "a.jsonl", rows + [rows[1]])
    with pytest.raises(UserError, match=r"a.jsonl:5: duplicate record id .* \(first seen on line 2\)"):
        build(section(tmp_path, [a]))
    b = synthetic.write_jsonl(tmp_path / "b.jsonl", rows[:2])
    c = synthetic.write_jsonl(tmp_path / "c.jsonl", rows[2:] + [rows[0]])
    with pytest.raises(UserError, match=r"c.jsonl:3: duplicate record id .* \(also at .*b.jsonl:1\)"):
        build(section(tmp_path, [b, c], out=str(tmp_path / "d2")))


def test_resume_skips_done_shards_and_refuses_changed_inputs(tmp_path, monkeypatch):
    inputs = synthetic.write_corpus(tmp_path / "src", 90, shards=3, seed=9)
    reference = build(section(tmp_path, inputs, out=str(tmp_path / "ref")))

    real = build_module.render_shard
    calls = []

    def crash_on_third(index, *args):
        calls.append(index)
        if index == 2:
            raise KeyboardInterrupt
        return real(index, *args)

    monkeypatch.setattr(build_module, "render_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build(section(tmp_path, inputs))
    assert not (tmp_path / "ds").exists() and (tmp_path / "ds.partial").exists()

    calls.clear()
    monkeypatch.setattr(build_module, "render_shard", lambda index, *a: (calls.append(index), real(index, *a)))
    ds = build(section(tmp_path, inputs))
    assert calls == [2]
    for split in ("train", "valid"):
        for name in ("tokens.bin", "spans.bin", "tokens.idx"):
            assert (ds / split / name).read_bytes() == (reference / split / name).read_bytes()

    monkeypatch.setattr(build_module, "render_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build(section(tmp_path, inputs, out=str(tmp_path / "again")))
    inputs[0].write_text(inputs[0].read_text().replace("answer", "ANSWER"))
    with pytest.raises(UserError, match="input files changed.*synth_000.jsonl"):
        build(section(tmp_path, inputs, out=str(tmp_path / "again")))


def test_resume_checks_rendered_inputs_by_sha256_and_the_others_by_size_and_mtime(tmp_path, monkeypatch):
    inputs = synthetic.write_corpus(tmp_path / "src", 90, shards=3, seed=10)
    real = build_module.render_shard

    def crash_on_third(index, *args):
        if index == 2:
            raise KeyboardInterrupt
        return real(index, *args)

    def interrupted(out):
        monkeypatch.setattr(build_module, "render_shard", crash_on_third)
        with pytest.raises(KeyboardInterrupt):
            build(section(tmp_path, inputs, out=str(tmp_path / out)))
        monkeypatch.setattr(build_module, "render_shard", real)

    # Same bytes, new mtime: a rendered shard is still reused.
    interrupted("touched")
    os.utime(inputs[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    calls = []
    monkeypatch.setattr(build_module, "render_shard", lambda index, *a: (calls.append(index), real(index, *a)))
    build(section(tmp_path, inputs, out=str(tmp_path / "touched")))
    assert calls == [2]
    monkeypatch.setattr(build_module, "render_shard", real)

    # New bytes of the same size, old mtime: the sha256 of the rendered shard's file catches it.
    interrupted("edited")
    stat = inputs[1].stat()
    inputs[1].write_text(inputs[1].read_text().replace("We need", "WE NEED"))
    os.utime(inputs[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UserError, match=r"input files changed: \['[^,]*synth_001.jsonl'\]"):
        build(section(tmp_path, inputs, out=str(tmp_path / "edited")))

    # A file not rendered yet that changed.
    interrupted("unrendered")
    inputs[2].write_text(inputs[2].read_text() + "\n")
    with pytest.raises(UserError, match=r"input files changed: \['[^,]*synth_002.jsonl'\]"):
        build(section(tmp_path, inputs, out=str(tmp_path / "unrendered")))


def test_existing_output_and_missing_inputs_are_refused(tmp_path):
    (tmp_path / "ds").mkdir()
    src = synthetic.write_jsonl(tmp_path / "a.jsonl", synthetic.records(2))
    with pytest.raises(UserError, match="already exists"):
        build(section(tmp_path, [src]))
    with pytest.raises(UserError, match="matches no file"):
        build(section(tmp_path, [tmp_path / "nope*.jsonl"], out=str(tmp_path / "x")))


def test_cli_build_and_exit_codes(tmp_path):
    src = synthetic.write_jsonl(tmp_path / "a.jsonl", synthetic.records(20))
    cfg = tmp_path / "build.toml"
    cfg.write_text(f'[data]\ninputs = ["{src}"]\nformat = "synth"\nout = "{tmp_path / "ds"}"\nseq_len = 512\n')
    run = lambda *args: subprocess.run([sys.executable, "-m", "vpmoe.cli", *args], capture_output=True, text=True)
    ok = run("data", "build", str(cfg), "--set", "data.valid_fraction=0.5")
    assert ok.returncode == 0, ok.stderr
    assert "20 records accepted" in ok.stdout
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["valid_fraction"] == 0.5
    bad = run("data", "build", str(cfg), "--set", "data.colour=1")
    assert bad.returncode == 2 and "--set 'data.colour=1': unknown key 'data.colour'" in bad.stderr
    inspect = run("data", "inspect", str(tmp_path / "ds"), "--sample", "1")
    assert inspect.returncode == 0 and "[final <|start|>assistant<|channel|>final" in inspect.stdout
    assert run("data", "inspect", str(tmp_path / "ds"), "--sample", "999").returncode == 2
    assert run("data", "inspect", str(tmp_path)).returncode == 2
