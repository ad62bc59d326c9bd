import shutil

import pytest

from vpmoe.data import synthetic
from vpmoe.hostmem import keep_freed_memory

# Disks on CI machines can be small and the tiny models are ~100 MB each (the o200k head): passing tests' tmp_path
# directories go (tmp_path_retention_policy in pyproject.toml), and so do a module fixture's directories when its
# module ends. Session fixtures keep theirs.
_module_dirs: dict[int, list] = {}


def pytest_configure(config):
    keep_freed_memory()  # the tests run tiny models in this process, as the commands do (vpmoe/hostmem.py)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope != "module" or "tmp_path_factory" not in fixturedef.argnames:
        return (yield)
    base = request.getfixturevalue("tmp_path_factory").getbasetemp()
    before = set(base.iterdir())
    try:
        return (yield)
    finally:
        _module_dirs.setdefault(id(fixturedef), []).extend(set(base.iterdir()) - before)


def pytest_fixture_post_finalizer(fixturedef, request):
    for path in _module_dirs.pop(id(fixturedef), []):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """A small packed synthetic dataset (seq_len 512), built once per test session."""
    from vpmoe.data.build import DataSection, build

    root = tmp_path_factory.mktemp("synth_dataset")
    inputs = synthetic.write_corpus(root / "src", 400, shards=2, seed=7)
    return build(DataSection(
        inputs=[str(p) for p in inputs], format="synth", out=str(root / "ds"), seq_len=512, pack=True,
        valid_fraction=0.2,
    ))
