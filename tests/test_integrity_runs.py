"""Issue 18 on the run side: `vpmoe train`, `vpmoe export` and `vpmoe eval` misused as a team would, through real
`python -m vpmoe.cli` processes. Each refusal is one line on stderr with the right exit code (2 bad input, 1
environment) and no traceback, and leaves what it did not write as it was.

One short training run (two checkpoints) is made once; each case works on a clone of it (large files hard-linked:
no case changes a file in place)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vpmoe import cli
from vpmoe.artifacts import checkpoints
from vpmoe.artifacts.lock import LOCK_FILE
from vpmoe.data import synthetic
from vpmoe.errors import UserError
from vpmoe.model.config import load_model_config
from vpmoe.train import resume
from vpmoe.train.config import load_train_config
from vpmoe.train.trainer import train

SETTINGS = ["train.log_every=1", "optim.warmup_steps=1", "checkpoint.every=1", "checkpoint.keep=3"]


def sets(run, data, steps, *more):
    return [*SETTINGS, f"run.dir={json.dumps(str(run))}", f"data.path={json.dumps(str(data))}",
            f"train.steps={steps}", *more]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two datasets with the same sample count and other records, and a run of 2 steps (checkpoints 1 and 2)."""
    root = tmp_path_factory.mktemp("runs_world")
    data = {}
    for name, seed in (("ds1", 11), ("ds2", 17)):  # 6 train and 2 valid samples each
        src = synthetic.write_jsonl(root / f"{name}.jsonl", synthetic.records(8, seed=seed))
        (root / f"{name}.toml").write_text(f'[data]\ninputs = ["{src}"]\nformat = "synth"\nout = "{root / name}"\n'
                                           f'seq_len = 256\nvalid_fraction = 0.25\n')
        assert cli.main(["data", "build", str(root / f"{name}.toml")]) == 0
        data[name] = root / name
    counts = [json.loads((d / "manifest.json").read_text())["splits"] for d in data.values()]
    assert counts[0]["train"]["samples"] == counts[1]["train"]["samples"] and counts[0]["valid"]["samples"] > 0
    run = train(load_train_config("tiny_ce", sets(root / "run", data["ds1"], 2)))
    assert [p.name for p in checkpoints.complete_checkpoints(run)] == ["step_0000001", "step_0000002"]
    return {"root": root, "run": run, **data}


def clone(source: Path, dest: Path) -> Path:
    """A copy of a run directory: files over 1 MiB hard-linked (nothing changes them in place), the rest copied."""
    def link_or_copy(src, dst):
        if os.path.getsize(src) > 1 << 20:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)
    return Path(shutil.copytree(source, dest, copy_function=link_or_copy))


def cut(path: Path, keep: int) -> None:
    """Truncate a (possibly hard-linked) file without touching its other names."""
    data = path.read_bytes()[:keep]
    path.unlink()
    path.write_bytes(data)


def vpmoe(*args, cwd=None, prelude=""):
    """`python -m vpmoe.cli ARGS`; `prelude` is Python run first in the same process (to simulate a full disk)."""
    code = f"{prelude}\nimport sys\nfrom vpmoe.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def in_process(*args, capfd):
    """`vpmoe ARGS` in this process (no start-up cost), as a CompletedProcess with what it printed."""
    capfd.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def train_cli(run, data, steps, *more, **kw):
    return vpmoe("train", "tiny_ce", *[a for s in sets(run, data, steps, *more) for a in ("--set", s)], **kw)


def fails(p, code: int, says: str) -> None:
    """Exit `code`, no traceback, and the last line of stderr is vpmoe's one-line message containing `says`."""
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    assert p.returncode == code, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("vpmoe: error: " if code == 2 else "vpmoe: stopped: "), p.stderr
    assert says in last, last


def succeeds(p) -> None:
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr, p.stderr


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its small files' contents (what a refusal must leave as it was)."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.stat().st_size < 1 << 20 else p.stat().st_size)
            for p in sorted(directory.rglob("*")) if p.is_file()}


HOLDER = textwrap.dedent("""
    import sys
    from vpmoe.artifacts.lock import lock_dir
    with lock_dir(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        sys.stdin.read()
""")


def hold(path, what):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), what], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---- item 1: one writer per run directory and per export --------------------------------------------------------


def test_a_second_trainer_on_a_run_directory_is_refused(world, tmp_path):
    run = clone(world["run"], tmp_path / "run")
    holder = hold(run, "the training run")
    try:
        before = snapshot(run)
        p = train_cli(run, world["ds1"], 4, "optim.lr_adam=0.02")
        after = snapshot(run)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    fails(p, 2, f"{run} is in use by the training run (pid {holder.pid} on host")
    assert after == before


def test_a_dead_trainers_lock_is_taken_over_and_a_torn_metrics_line_dropped(world, tmp_path):
    """What a killed run leaves: its lock file and half a metrics line. The next run takes over and resumes."""
    run = clone(world["run"], tmp_path / "run")
    holder = hold(run, "the training run")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    p = train_cli(run, world["ds1"], 3)
    succeeds(p)
    assert f"taking over the lock on {run}: the training run (pid {holder.pid}" in p.stderr
    assert f"dropped the torn last line of {run / 'metrics.jsonl'}" in p.stderr
    assert "resumed from" in p.stdout
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (run / LOCK_FILE).exists()


def test_a_damaged_metrics_line_before_the_last_is_refused(world, tmp_path):
    run = clone(world["run"], tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0][:20], *lines[1:]]) + "\n")
    fails(train_cli(run, world["ds1"], 3), 2, f"{run / 'metrics.jsonl'} line 1 is damaged")


def test_run_directories_that_cannot_be_written(world, tmp_path, capfd):
    """In this process (the lock is taken before anything is built, so these fail at once)."""
    (tmp_path / "file").write_text("x")
    for run, says in ((tmp_path / "file", "is a file, not a directory: the training run needs"),
                      (tmp_path / "file" / "run", "a part of that path is a file"),
                      ("/proc/vpmoe-test-run", "cannot create /proc/vpmoe-test-run")):
        rc = cli.main(["train", "tiny_ce", *[a for s in sets(run, world["ds1"], 1) for a in ("--set", s)]])
        out, err = capfd.readouterr()
        assert rc == 2 and "Traceback" not in out + err
        assert err.strip().splitlines()[-1].startswith("vpmoe: error: ") and says in err, err
    assert (tmp_path / "file").read_text() == "x"


# ---- item 2: a resume must match the run's dataset, model and stage ------------------------------------------


def test_resuming_on_another_dataset_is_refused_unless_asked_for_and_then_both_are_recorded(world, tmp_path):
    run = clone(world["run"], tmp_path / "run")
    before = snapshot(run)
    fails(train_cli(run, world["ds2"], 3), 2,
          f"run.dir {run} was trained on another dataset (ds1) than data.path {world['ds2']}")
    assert snapshot(run) == before

    p = train_cli(run, world["ds2"], 3, "run.allow_dataset_change=true")
    succeeds(p)
    assert f"goes on with dataset {world['ds2']} (it was trained on ds1 up to step_0000002)" in p.stderr
    for record in (json.loads((d / "provenance.json").read_text()) for d in (run, run / "checkpoints/step_0000003")):
        assert record["parents"][0]["dataset"] == "ds2" and record["from_step"] == 2
        assert [(h["parents"][0]["dataset"], h["from_step"]) for h in record["history"]] == [("ds1", 0)]
        assert record["dataset_sha256"] == resume.dataset_sha256(json.loads((world["ds2"] / "manifest.json")
                                                                            .read_text()))
    # The same bytes built again are the same dataset: no refusal.
    rebuilt = shutil.copytree(world["ds1"], tmp_path / "ds1_copy")
    succeeds(train_cli(clone(world["run"], tmp_path / "run2"), rebuilt, 3))


def test_resuming_with_another_model_is_refused(world, tmp_path):
    run = clone(world["run"], tmp_path / "run")
    before = snapshot(run)
    fails(train_cli(run, world["ds1"], 3, 'model.config="tiny_dense"'), 2,
          f"run.dir {run} holds a model that differs from model.config tiny_dense")
    assert snapshot(run) == before


def test_resuming_with_another_stage_is_refused_and_other_changes_are_listed(world, capsys):
    checkpoint = checkpoints.latest(world["run"])
    manifest = json.loads((world["ds1"] / "manifest.json").read_text())
    model = load_model_config("tiny_moe")
    kd = load_train_config("tiny_ce", sets(world["run"], world["ds1"], 3, 'train.stage="kd_offline"', "loss.kd=1.0"))
    with pytest.raises(UserError, match="was trained with train.stage = 'ce', this config asks for 'kd_offline': a "
                                        "new stage needs a new run.dir"):
        resume.check(kd, checkpoint, model, manifest)
    lr = load_train_config("tiny_ce", sets(world["run"], world["ds1"], 9, "optim.lr_adam=0.5"))
    resume.check(lr, checkpoint, model, manifest)
    assert capsys.readouterr().err.strip() == f"note: resuming {world['run']} with changed settings: " \
                                              f"optim.lr_adam 0.01 -> 0.5"


# ---- item 4: a damaged checkpoint is skipped (train, export, eval) -----------------------------------------------


def test_a_damaged_latest_checkpoint_falls_back_with_a_message_and_is_saved_again(world, tmp_path):
    run = clone(world["run"], tmp_path / "run")
    data = next((run / "checkpoints/step_0000002").glob("*.distcp"))
    size = data.stat().st_size
    cut(data, size // 2)
    why = f"{data.name} is {size // 2} bytes, complete.json records {size}"
    p = train_cli(run, world["ds1"], 2)
    succeeds(p)
    assert f"warning: checkpoint {run}/checkpoints/step_0000002 is damaged ({why}): falling back to step_0000001" \
           in p.stderr
    assert "resumed from" in p.stdout and "(step 1)" in p.stdout
    assert checkpoints.verify(run / "checkpoints/step_0000002") is None  # step 2 again, saved whole


def test_a_checkpoint_file_altered_in_place_is_found_by_its_sha256_and_skipped(world, tmp_path, capfd):
    """Same size, one byte flipped: only the sha256 of complete.json can tell."""
    run = clone(world["run"], tmp_path / "run")
    data = next((run / "checkpoints/step_0000002").glob("*.distcp"))
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    data.unlink()  # the clone hard-links large files: write a new one, leave the fixture's as it is
    data.write_bytes(bytes(flipped))
    assert data.stat().st_size == json.loads((data.parent / "complete.json").read_text())["files"][data.name]["bytes"]
    warning = (f"warning: checkpoint {run}/checkpoints/step_0000002 is damaged ({data.name} has another sha256 than "
               f"complete.json records): falling back to step_0000001")

    p = in_process("export", run, "--out", tmp_path / "out", capfd=capfd)
    succeeds(p)
    assert warning in p.stderr
    assert json.loads((tmp_path / "out/provenance.json").read_text())["source"].endswith("step_0000001")

    p = train_cli(run, world["ds1"], 2)
    succeeds(p)
    assert warning in p.stderr and "(step 1)" in p.stdout
    assert checkpoints.verify(run / "checkpoints/step_0000002") is None  # step 2 again, saved whole


def test_export_and_eval_fall_back_from_a_damaged_checkpoint_and_refuse_a_damaged_one_named(world, tmp_path):
    run = clone(world["run"], tmp_path / "run")
    cut(run / "checkpoints/step_0000002/trainer_rank0.pt", 10)
    warning = f"warning: checkpoint {run}/checkpoints/step_0000002 is damaged (trainer_rank0.pt is 10 bytes"

    p = vpmoe("export", run, "--out", tmp_path / "out")
    succeeds(p)
    assert warning in p.stderr and "falling back to step_0000001" in p.stderr
    assert json.loads((tmp_path / "out/provenance.json").read_text())["source"].endswith("step_0000001")

    p = vpmoe("eval", "--checkpoint", run, "--set", 'eval.parts=["sanity"]')
    succeeds(p)
    assert warning in p.stderr and (run / "eval/step_0000001.json").is_file()

    p = vpmoe("eval", "--checkpoint", run, "--all-steps", "--set", 'eval.parts=["sanity"]')
    succeeds(p)
    assert f"warning: skipping checkpoint {run}/checkpoints/step_0000002: it is damaged (trainer_rank0.pt" in p.stderr

    fails(vpmoe("export", run / "checkpoints/step_0000002", "--out", tmp_path / "out2"), 2,
          f"checkpoint {run}/checkpoints/step_0000002 is damaged (trainer_rank0.pt is 10 bytes")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()


def test_a_run_whose_every_checkpoint_is_damaged_is_refused(world, tmp_path):
    run = clone(world["run"], tmp_path / "run")
    for step in ("step_0000001", "step_0000002"):
        (run / "checkpoints" / step / "complete.json").write_text("{")
    fails(train_cli(run, world["ds1"], 3), 2, f"every complete checkpoint of {run} is damaged")
    fails(vpmoe("export", run, "--out", tmp_path / "out"), 2, "step_0000002: its complete.json is damaged")


# ---- item 6: a full disk while saving ----------------------------------------------------------------------------

FULL_DISK = textwrap.dedent("""
    import errno, os
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    os.fsync = fsync  # DCP syncs every file it writes: the disk is full from the first checkpoint on
""")


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_the_run_resumable(world, tmp_path):
    run = clone(world["run"], tmp_path / "run")
    fails(train_cli(run, world["ds1"], 3, prelude=FULL_DISK), 1,
          f"no space left for the checkpoint of step 3 in {run / 'checkpoints'}: free some space on that device and "
          f"run the same command to resume (from step_0000002)")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]


# ---- items 5, 6, 7: export --------------------------------------------------------------------------------------


def test_export_keeps_what_it_did_not_write_and_refuses_bad_outputs(world, tmp_path, capfd):
    foreign = tmp_path / "out.partial"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    fails(vpmoe("export", world["run"], "--out", tmp_path / "out"), 2,
          f"{foreign} exists but is not an export in progress: remove it")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and not (tmp_path / "out").exists()
    # Dot-files are not ours either, nor is anything beside an earlier export's mark that the export does not write.
    for own, theirs in (([], ".notes"), (["export.json", "model/x.safetensors"], ".cache/notes.txt"),
                        (["export.json"], "notes.txt")):
        shutil.rmtree(foreign)
        for name in [*own, theirs]:
            (foreign / name).parent.mkdir(parents=True, exist_ok=True)
            (foreign / name).write_text("mine")
        before = snapshot(foreign)
        fails(in_process("export", world["run"], "--out", tmp_path / "out", capfd=capfd), 2,
              f"{foreign} exists but is not an export in progress: remove it, or choose another --out (it holds "
              f"{theirs.split('/')[0]!r}, which vpmoe export does not write)")
        assert snapshot(foreign) == before and not (tmp_path / "out").exists()

    (tmp_path / "file").write_text("x")
    fails(vpmoe("export", world["run"], "--out", tmp_path / "file"), 2, "already exists: choose a new --out")
    fails(vpmoe("export", world["run"], "--out", tmp_path / "file" / "out"), 2, "file is a file, not a directory")
    fails(vpmoe("export", world["run"], "--out", "/proc/vpmoe-test-export"), 2,
          "cannot create /proc/vpmoe-test-export.partial")

    holder = hold(tmp_path / "held.partial", "the export")
    try:
        p = vpmoe("export", world["run"], "--out", tmp_path / "held")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    fails(p, 2, f"held.partial is in use by the export (pid {holder.pid}")

    full = ("import errno, safetensors, vpmoe.artifacts.weights as w\n"
            "def save_file(tensors, path, metadata=None):\n"
            "    raise safetensors.SafetensorError(f'Error while serializing: I/O error: No space left on device "
            "(os error {errno.ENOSPC}) at path \"{path}\"')\n"
            "w.save_file = save_file\n")
    fails(vpmoe("export", world["run"], "--out", tmp_path / "full", prelude=full), 1,
          f"no space left for the export in {tmp_path / 'full.partial'}")
    assert not (tmp_path / "full.partial").exists()  # what it wrote is gone: the space is free again

    killed = tmp_path / "full.partial"  # what a killed export leaves: its mark and a half-written model
    (killed / "model").mkdir(parents=True)
    (killed / "export.json").write_text("{}")
    (killed / "model" / ".shard-00001.safetensors").write_bytes(b"half")
    p = vpmoe("export", world["run"], "--out", tmp_path / "full")
    succeeds(p)
    assert f"removing the unfinished export in {killed}" in p.stdout and not killed.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "full").iterdir()} == \
           {p.name: 0o666 & ~umask for p in (tmp_path / "full").iterdir()}


# ---- item 9: eval of a run without eval.dataset -------------------------------------------------------------------


def test_eval_of_a_run_measures_held_out_loss_on_the_runs_dataset(world, tmp_path):
    run = clone(world["run"], tmp_path / "run")
    p = vpmoe("eval", "--checkpoint", run, "--set", 'eval.parts=["heldout"]')
    succeeds(p)
    assert f"held-out loss on {world['ds1']} (valid), the dataset run@2 was trained on" in p.stdout
    report = json.loads((run / "eval/step_0000002.json").read_text())
    valid = json.loads((world["ds1"] / "manifest.json").read_text())["splits"]["valid"]
    assert report["heldout"]["samples"] == valid["samples"] and report["heldout"]["spans"]["all"]["tokens"] > 0


# ---- every verb on broken inputs ------------------------------------------------------------------------------


def test_every_verb_on_broken_inputs_says_one_line_without_a_traceback(world, tmp_path, capfd):
    (tmp_path / "bad.toml").write_text("x = \n")
    (tmp_path / "file").write_text("x")
    damaged = clone(world["run"], tmp_path / "damaged")
    for step in ("step_0000001", "step_0000002"):
        cut(next((damaged / "checkpoints" / step).glob("*.distcp")), 100)
    configs = (tmp_path / "bad.toml", tmp_path, tmp_path / "nope")
    paths = (tmp_path / "nope", tmp_path / "file", tmp_path, damaged)
    cases = [[*verb, config] for config in configs for verb in (
        ["data", "build"], ["teacher", "score"], ["train"], ["upcycle"], ["autotune"], ["profile"], ["params"],
        ["eval"])]
    cases += [["export", path, "--out", tmp_path / "out"] for path in paths]
    cases += [["eval", "--checkpoint", path] for path in paths]
    cases += [["data", verb, path] for verb in ("inspect", "verify") for path in paths]
    cases += [["demo", "--out", tmp_path / "file"], ["train", "tiny_ce", "--set", "run.colour=1"],
              ["eval", "--checkpoint", world["run"], "--dataset", tmp_path / "file"],
              ["eval", "--checkpoint", world["run"], "--set", f"eval.suite={json.dumps(str(tmp_path))}"]]
    says = {"--dataset": f"eval.dataset {tmp_path / 'file'} is not a directory",  # not "does not exist"
            f"eval.suite={json.dumps(str(tmp_path))}": f"suite file {tmp_path} is not a file"}
    for argv in cases:
        rc = cli.main([str(a) for a in argv])
        out, err = capfd.readouterr()
        assert "Traceback" not in out + err, (argv, err)
        assert rc == 2 and err.strip().splitlines()[-1].startswith("vpmoe: error: "), (argv, rc, err)
        assert all(message in err for key, message in says.items() if key in argv[-2:]), err
