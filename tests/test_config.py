import tomllib
from dataclasses import dataclass, field
from typing import Literal

import pytest

from vpmoe import config
from vpmoe.errors import UserError


@dataclass
class Inner:
    name: str
    size: int = 4
    ratio: float = 0.5
    mode: Literal["a", "b"] = "a"
    paths: list[str] = field(default_factory=list)


@dataclass
class Outer:
    inner: Inner


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_loads_defaults_and_casts_int_to_float(tmp_path):
    cfg = config.load(write(tmp_path, '[inner]\nname = "x"\nratio = 1\n'), Outer)
    assert cfg.inner == Inner(name="x", size=4, ratio=1.0)
    assert isinstance(cfg.inner.ratio, float)


@pytest.mark.parametrize("text, message", [
    ('[inner]\nname = "x"\nsizee = 3\n', "unknown key 'inner.sizee'"),
    ('[inner]\nsize = 3\n', "missing key 'inner.name'"),
    ('[inner]\nname = "x"\nsize = "3"\n', "'inner.size' must be int"),
    ('[inner]\nname = "x"\nsize = true\n', "'inner.size' must be int, got bool"),
    ('[inner]\nname = "x"\nmode = "c"\n', "'inner.mode' must be one of"),
    ('[inner]\nname = "x"\npaths = [1]\n', "'inner.paths[0]' must be str"),
    ('[other]\n', "unknown key 'other'"),
    ('[inner\n', "not valid TOML"),
])
def test_bad_configs_name_the_key_and_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        config.load(path, Outer)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_overrides_are_parsed_as_toml_values_and_checked(tmp_path):
    path = write(tmp_path, '[inner]\nname = "x"\n')
    cfg = config.load(path, Outer, ["inner.size=9", "inner.name=plain words", 'inner.paths=["a", "b"]'])
    assert (cfg.inner.size, cfg.inner.name, cfg.inner.paths) == (9, "plain words", ["a", "b"])
    with pytest.raises(UserError, match="unknown key 'inner.nope'"):
        config.load(path, Outer, ["inner.nope=1"])
    with pytest.raises(UserError, match="expected section.key=value"):
        config.load(path, Outer, ["size=1"])


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = Outer(Inner(name='q"uote', size=3, ratio=1e-6, mode="b", paths=["p"]))
    text = config.dumps_toml(cfg)
    assert config.from_dict(tomllib.loads(text), Outer, "dumped") == cfg
    assert config.config_hash(cfg) == config.config_hash(Outer(Inner(**vars(cfg.inner))))
    assert config.config_hash(cfg) != config.config_hash(Outer(Inner(name="other")))
