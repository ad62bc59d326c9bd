"""Issue 18, item 1: one writer per directory (`vpmoe.artifacts.lock.lock_dir`), tried with real second processes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from vpmoe.artifacts.lock import LOCK_FILE, lock_dir
from vpmoe.data import synthetic
from vpmoe.errors import UserError

HOLDER = textwrap.dedent("""
    import sys
    from vpmoe.artifacts.lock import lock_dir
    with lock_dir(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin (or kills us)
""")


def hold(path, what="the test holder") -> subprocess.Popen:
    """A second process that takes the lock on `path` and keeps it until its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), what], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_refuses_a_second_process_naming_its_pid_and_host(tmp_path):
    holder = hold(tmp_path / "run")
    try:
        with pytest.raises(UserError) as e:
            with lock_dir(tmp_path / "run", "the second one"):
                pass
        assert f"in use by the test holder (pid {holder.pid} on host {socket.gethostname()}" in str(e.value)
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert not (tmp_path / "run").exists()  # the holder created it and wrote nothing else: it is gone again
    with lock_dir(tmp_path / "run", "the second one") as path:  # free now
        assert json.loads((path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_dead_holders_lock_is_taken_over_with_a_message(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    holder = hold(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    left = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert left["pid"] == holder.pid and left["what"] == "the test holder"

    with lock_dir(tmp_path / "run", "the next one"):
        note = capsys.readouterr().err
        assert f"taking over the lock on {tmp_path / 'run'}: the test holder (pid {holder.pid} on host " \
               f"{socket.gethostname()}" in note and "is no longer running" in note
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["what"] == "the next one"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]  # only its own file went


def test_the_release_leaves_a_newer_holders_lock_alone(tmp_path):
    """A staging directory removed while locked (renamed aside, then deleted, as the build and scoring do): its name
    is free at once, and the release must not touch what another process has put there since."""
    with lock_dir(tmp_path / "stage", "the first one"):
        os.rename(tmp_path / "stage", tmp_path / "aside")
        shutil.rmtree(tmp_path / "aside")
        holder = hold(tmp_path / "stage", "the second one")
    try:
        assert json.loads((tmp_path / "stage" / LOCK_FILE).read_text())["pid"] == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_unusable_paths_are_one_line_user_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        with lock_dir(tmp_path / "file", "the test"):
            pass
    with pytest.raises(UserError, match="a part of that path is a file"):
        with lock_dir(tmp_path / "file" / "run", "the test"):
            pass
    with pytest.raises(UserError, match=r"cannot create /proc/vpmoe-test-run .*: the test needs to write there"):
        with lock_dir("/proc/vpmoe-test-run", "the test"):
            pass


def cli(*args):
    return subprocess.run([sys.executable, "-m", "vpmoe.cli", *args], capture_output=True, text=True, timeout=600)


def test_a_second_data_build_into_one_output_is_refused(tmp_path):
    src = synthetic.write_jsonl(tmp_path / "a.jsonl", synthetic.records(8))
    cfg = tmp_path / "build.toml"
    cfg.write_text(f'[data]\ninputs = ["{src}"]\nformat = "synth"\nout = "{tmp_path / "ds"}"\nseq_len = 512\n')
    holder = hold(tmp_path / "ds.partial", "the data build")  # a build of the same output, still running
    try:
        second = cli("data", "build", str(cfg))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"ds.partial is in use by the data build (pid {holder.pid} on host" in second.stderr
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()
    assert cli("data", "build", str(cfg)).returncode == 0  # and once it is gone, the build runs
