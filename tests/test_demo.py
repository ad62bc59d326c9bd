import json

from vpmoe.demo import DemoSize, demo


def test_demo_end_to_end_at_a_smaller_size(tmp_path):
    size = DemoSize(records=160, teacher_steps=6, student_steps=4, eval_samples=4, suite_items=4, max_new_tokens=8)
    result = demo(str(tmp_path / "demo"), size)
    reports = result["reports"]
    assert set(reports) == {"CE only", "offline KD"}
    for report in reports.values():
        assert report["heldout"]["spans"]["final"]["tokens"] > 0
        assert report["teacher_kl"]["all"]["tokens"] > 0
        assert 0.0 <= report["suite"]["accuracy"] <= 1.0
    assert set(result["seconds"]) >= {"corpus", "dataset", "teacher", "scoring", "student CE", "student KD", "eval"}
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["artifacts"]["teacher"].endswith("teacher")
    assert (tmp_path / "demo" / "dataset" / "train" / "teacher" / "topk_ids.idx").is_file()
