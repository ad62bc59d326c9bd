"""`vpmoe demo`: the pipeline end to end on CPU with tiny sizes and the real code paths.

Stages run in order; each prints what it made and where, and the run ends with a table of stage times and
artifacts. Stages that exist today: corpus -> dataset (more join as the pipeline grows).
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.data.inspect import inspect
from vpmoe.errors import UserError

RECORDS = 3000
SEQ_LEN = 512


def demo(out: str, records: int = RECORDS) -> list[tuple[str, float, str]]:
    root = Path(out)
    if root.exists():
        if not (root / ".vpmoe-demo").exists():
            raise UserError(f"{root} exists and is not a demo directory: choose another --out")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / ".vpmoe-demo").touch()
    table: list[tuple[str, float, str]] = []

    def stage(name: str, fn: Callable[[], str]) -> None:
        print(f"\n== {name}")
        start = time.perf_counter()
        where = fn()
        table.append((name, time.perf_counter() - start, where))

    stage("corpus", lambda: str(synthetic.write_corpus(root / "corpus", records, shards=2, seed=0)[0].parent))
    dataset = root / "dataset"
    stage("dataset", lambda: str(build(DataSection(
        inputs=[str(root / "corpus" / "*.jsonl")], format="synth", out=str(dataset), seq_len=SEQ_LEN, pack=True,
        valid_fraction=0.05, workers=2,
    ))))

    summary = io.StringIO()
    inspect(str(dataset), out=summary)
    print("\n".join(summary.getvalue().splitlines()[:4]))

    print("\n== summary")
    print(f"{'stage':<10} {'seconds':>8}  artifact")
    for name, seconds, where in table:
        print(f"{name:<10} {seconds:>8.1f}  {where}")
    return table
