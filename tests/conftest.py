import pytest

from vpmoe.data import synthetic


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
