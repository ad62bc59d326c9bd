"""Issue 18: `vpmoe data build/inspect/verify` and `vpmoe teacher score` on broken inputs. Each case is one line
on stderr and the right exit code (2 bad input, 1 environment), never a traceback.

The cases run through `vpmoe.cli.main` in this process (a traceback can only come from an exception that escapes
`main`, which the test would see) with the file descriptors captured; a few run as real `python -m vpmoe.cli`
processes, for what only a process shows (a closed pipe, a second process holding a lock)."""

import errno
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vpmoe import cli
from vpmoe.data import synthetic
from vpmoe.testing.teachers import save_tiny_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A source file, a good dataset, a tiny teacher; each case works on copies."""
    root = tmp_path_factory.mktemp("cli_world")
    src = synthetic.write_jsonl(root / "src.jsonl", synthetic.records(24, seed=3))
    good = root / "good"
    write_build(root / "good.toml", src, good)
    assert cli.main(["data", "build", str(root / "good.toml")]) == 0
    return {"root": root, "src": src, "good": good, "teacher": save_tiny_teacher(root / "teacher", seed=1)}


def write_build(path, src, out, **extra):
    lines = [f'[data]\ninputs = {json.dumps([str(s) for s in (src if isinstance(src, list) else [src])])}',
             'format = "synth"', f'out = "{out}"', "seq_len = 512", "pack = true", "valid_fraction = 0.25"]
    path.write_text("\n".join(lines + [f"{k} = {json.dumps(v)}" for k, v in extra.items()]) + "\n")
    return str(path)


def write_score(path, teacher, data):
    path.write_text(f'[teacher]\npath = "{teacher}"\ndataset = "{data}"\nk = 8\ndtype = "float32"\n\n[score]\n'
                    f'device = "cpu"\nbatch_tokens = 1024\nhead_chunk = 256\nshard_samples = 4\nprogress = false\n')
    return str(path)


def copy(w, tmp, name="ds"):
    return shutil.copytree(w["good"], tmp / name)


def cut(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


def full_disk(monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", full)


def build_case(**extra):
    def setup(w, tmp, mp):
        return ["data", "build", write_build(tmp / "b.toml", w["src"], tmp / "out", **extra)]
    return setup


def case_out_under_file(w, tmp, mp):
    (tmp / "file").write_text("x")
    return ["data", "build", write_build(tmp / "b.toml", w["src"], tmp / "file" / "out")]


def case_out_in_proc(w, tmp, mp):
    return ["data", "build", write_build(tmp / "b.toml", w["src"], "/proc/vpmoe-cli-test")]


def case_damaged_plan(w, tmp, mp):
    (tmp / "out.partial").mkdir()
    (tmp / "out.partial" / "plan.json").write_text("{")
    return build_case()(w, tmp, mp)


def case_empty_input(w, tmp, mp):
    (tmp / "empty.jsonl").write_text("")
    return ["data", "build", write_build(tmp / "b.toml", tmp / "empty.jsonl", tmp / "out")]


def case_bad_json(w, tmp, mp):
    (tmp / "bad.jsonl").write_text(w["src"].read_text() + '{"synth_id": "x\n')
    return ["data", "build", write_build(tmp / "b.toml", tmp / "bad.jsonl", tmp / "out")]


def case_bad_parquet(w, tmp, mp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(synthetic.records(40, seed=2)), path, row_group_size=20)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(2).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 64] = b"\xab" * 64
    path.write_bytes(bytes(raw))
    return ["data", "build", write_build(tmp / "b.toml", path, tmp / "out")]


def case_build_full_disk(w, tmp, mp):
    full_disk(mp)
    return build_case()(w, tmp, mp)


def inspect_damaged(name, keep=None, text=None):
    def setup(w, tmp, mp):
        data = copy(w, tmp)
        if text is not None:
            (data / name).write_text(text)
        else:
            cut(data / name, keep)
        return ["data", "inspect", str(data)]
    return setup


def verify_flipped(w, tmp, mp):
    data = copy(w, tmp)
    raw = bytearray((data / "valid" / "spans.bin").read_bytes())
    raw[0] ^= 1
    (data / "valid" / "spans.bin").write_bytes(bytes(raw))
    return ["data", "verify", str(data)]


def score_case(damage=None, **kw):
    def setup(w, tmp, mp):
        data = copy(w, tmp)
        if damage:
            damage(data, mp)
        return ["teacher", "score", write_score(tmp / "s.toml", kw.get("teacher", w["teacher"]), data)]
    return setup


def read_only(data, mp):
    import pathlib

    real = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):  # the tests may run as root, for whom nothing is read-only
        if self.name == "teacher.partial":
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)
    mp.setattr(pathlib.Path, "mkdir", mkdir)


CASES = {
    # name: (setup -> argv, exit code, what stderr's last line says)
    "build: data.out under a file": (case_out_under_file, 2, "is a file, not a directory"),
    "build: data.out under /proc": (case_out_in_proc, 2, "cannot create /proc/vpmoe-cli-test.partial"),
    "build: damaged plan.json": (case_damaged_plan, 2, "plan.json is damaged. Remove"),
    "build: an empty input only": (case_empty_input, 2, "nothing to build"),
    "build: bad JSON": (case_bad_json, 2, "not valid JSON (Invalid control character at column 16)"),
    "build: damaged Parquet page": (case_bad_parquet, 2, "row group 1 (rows 21-40) cannot be read"),
    "build: --set of an unknown key": (lambda w, t, m: build_case()(w, t, m) + ["--set", "data.colour=1"], 2,
                                       "--set 'data.colour=1': unknown key 'data.colour'"),
    "build: missing config": (lambda w, t, m: ["data", "build", str(t / "nope.toml")], 2, "does not exist"),
    "build: full disk": (case_build_full_disk, 1, "no space left for the build in"),
    "inspect: tokens.bin truncated": (inspect_damaged("train/tokens.bin", keep=100), 2,
                                      "tokens.bin is 100 bytes, but tokens.idx describes"),
    "inspect: spans.idx truncated": (inspect_damaged("train/spans.idx", keep=30), 2, "spans.idx is not a Megatron"),
    "inspect: damaged manifest": (inspect_damaged("manifest.json", text="{"), 2, "manifest.json is damaged"),
    "inspect: a manifest of nothing": (inspect_damaged("manifest.json", text="[]"), 2, "is not a dataset manifest"),
    "inspect: a file, not a dataset": (lambda w, t, m: ["data", "inspect", str(w["src"])], 2, "is not a directory"),
    "inspect: no such dataset": (lambda w, t, m: ["data", "inspect", str(t / "nope")], 2, "does not exist"),
    "inspect: no such sample": (lambda w, t, m: ["data", "inspect", str(w["good"]), "--sample", "99"], 2,
                                "--sample 99 is out of range"),
    "inspect: no such split": (lambda w, t, m: ["data", "inspect", str(w["good"]), "--split", "test"], 2,
                               "has no split 'test'"),
    "verify: good": (lambda w, t, m: ["data", "verify", str(w["good"])], 0, "verified"),
    "verify: a flipped byte": (verify_flipped, 2, "valid/spans.bin has another sha256"),
    "verify: truncated": (lambda w, t, m: ["data", "verify", inspect_damaged("train/spans.bin", keep=5)(w, t, m)[-1]],
                          2, "spans.bin is 5 bytes"),
    "score: dataset truncated": (score_case(lambda d, m: cut(d / "valid" / "tokens.bin", 8)), 2,
                                 "tokens.bin is 8 bytes"),
    "score: damaged manifest": (score_case(lambda d, m: (d / "manifest.json").write_text("{")), 2,
                                "manifest.json is damaged"),
    "score: damaged plan.json": (score_case(lambda d, m: ((d / "teacher.partial").mkdir(),
                                                          (d / "teacher.partial" / "plan.json").write_text("{"))),
                                 2, "plan.json is damaged. Remove"),
    "score: read-only dataset": (score_case(read_only), 2, "teacher.partial (Read-only file system)"),
    "score: no teacher": (score_case(teacher="/nonexistent/teacher"), 2, "does not exist"),
    "score: full disk": (score_case(lambda d, m: full_disk(m)), 1, "no space left for the teacher scoring run"),
    "score: --set of an unknown key": (lambda w, t, m: score_case()(w, t, m) + ["--set", "score.speed=3"], 2,
                                       "--set 'score.speed=3': unknown key 'score.speed'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_broken_inputs_give_one_line_and_the_right_exit_code(name, world, tmp_path, monkeypatch, capfd):
    setup, code, says = CASES[name]
    argv = setup(world, tmp_path, monkeypatch)
    capfd.readouterr()
    rc = cli.main(argv)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert rc == code, err
    lines = err.strip().splitlines()
    assert says in (out if code == 0 else lines[-1]), err
    if code:
        assert lines[-1].startswith("vpmoe: error: " if code == 2 else "vpmoe: stopped: ")


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "vpmoe.cli", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


def test_as_processes(world, tmp_path):
    """The same through `python -m vpmoe.cli`: a broken build, inspect and verify, and `| head` on inspect."""
    data = copy(world, tmp_path)
    cut(data / "train" / "tokens.bin", 100)
    for args, code in (
        (["data", "build", write_build(tmp_path / "b.toml", tmp_path / "nothing.jsonl", tmp_path / "out")], 2),
        (["data", "inspect", str(data)], 2),
        (["data", "verify", str(data)], 2),
    ):
        p = run(*args)
        assert p.returncode == code and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1

    # The reader of the output goes away after one line: no complaint, the exit status of SIGPIPE.
    p = subprocess.run(["bash", "-c", f"{sys.executable} -m vpmoe.cli data inspect {world['good']} | head -1; "
                                      f"exit ${{PIPESTATUS[0]}}"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 141 and p.stderr == "" and p.stdout.startswith("dataset ")


HOLDER = textwrap.dedent("""
    import sys
    from vpmoe.artifacts.lock import lock_dir
    with lock_dir(sys.argv[1], "the teacher scoring run"):
        print("held", flush=True)
        sys.stdin.read()
""")


def test_a_second_scoring_run_of_one_dataset_is_refused(world, tmp_path):
    data = copy(world, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(data / "teacher.partial")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = run("teacher", "score", write_score(tmp_path / "s.toml", world["teacher"], data))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"teacher.partial is in use by the teacher scoring run (pid {holder.pid} on host" in p.stderr
    assert not (data / "teacher.partial").exists() and "teacher" not in json.loads((data / "manifest.json").read_text())
