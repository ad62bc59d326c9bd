import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMALL_DEMO = (
    "import vpmoe, sys; from vpmoe.demo import DemoSize, demo\n"
    "print('package at', vpmoe.__file__)\n"
    "demo('demo', DemoSize(records=160, teacher_steps=6, student_steps=4, eval_samples=4, suite_items=4, "
    "max_new_tokens=8, opd_steps=2, opd_prompts=2))\n"
)


def test_demo_end_to_end_from_a_plain_install_in_another_directory(tmp_path):
    """`pip install .` (not editable, into a folder of its own), then the demo at a smaller size from a directory
    that is not the checkout: the shipped configs come from the package data."""
    site, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--no-compile", "--target", str(site), str(ROOT)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    assert (site / "vpmoe" / "configs" / "train" / "tiny_ce.toml").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", SMALL_DEMO], capture_output=True, text=True, cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"package at {site}" in done.stdout
    summary = json.loads((work / "demo" / "summary.json").read_text())
    reports = summary["reports"]
    assert set(reports) == {"CE only", "offline KD", "online KD", "OPD from KD"}
    assert all(report["opd_kl"]["all"]["tokens"] > 0 for report in reports.values())
    for report in reports.values():
        assert report["heldout"]["spans"]["final"]["tokens"] > 0
        assert report["teacher_kl"]["all"]["tokens"] > 0
        suite = report["suite"]
        assert suite["items"] == 4 == len(suite["results"])
        assert suite["accuracy"] == sum(r["correct"] for r in suite["results"]) / 4
    assert set(summary["seconds"]) >= {"corpus", "dataset", "teacher", "scoring", "student CE", "student KD",
                                       "student online KD", "student OPD", "eval"}
    assert summary["artifacts"]["teacher"].endswith("teacher")
    assert (work / "demo" / "dataset" / "train" / "teacher" / "topk_ids.idx").is_file()
    assert (work / summary["artifacts"]["comparison plot"]).read_bytes().startswith(b"\x89PNG")
