"""The upcycling chain end to end on a miniature of the real objects (vocabulary 201088, hidden 64, donor 16/8
heads): every step writes an object the registry accepts, steps 4 and 5 are exact, outputs are deterministic."""

import json
import shutil

import pytest
import torch

from vpmoe.artifacts.models import load_model
from vpmoe.cli import main
from vpmoe.testing import upcycle as testing
from vpmoe.upcycle.config import load_upcycle_config
from vpmoe.upcycle.drift import CalibrationSection, calibration_rows
from vpmoe.upcycle.objects import read_provenance, weights_sha256
from vpmoe.upcycle.run import upcycle

CHAIN = [
    ("surgery", "qwen3-0_6B-o200k", "vpDense0-5_28.compat", "donor", "compat"),
    ("morph", "vpDense0-5_28.compat", "vpDense0-5_28.real", "compat", "real"),
    ("expand", "vpDense0-5_28.real", "vpDense", "real", "dense"),
    ("granular", "vpDense", "vpMoE", "dense", "moe"),
]
FP32_TOL = 1e-4  # max |dlogit| of an exact step: fp32 rounding on logits of magnitude ~10


def run_step(root, step, source, target, inp, out, seed=0, records=2, extra="", name=None):
    path = root / f"{name or step}.toml"
    path.write_text(testing.step_config_text(step, source, target, root / inp, root / out, root / "objects.toml",
                                             seed=seed, records=records, extra=extra))
    return upcycle(load_upcycle_config(path))[0]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycle_chain")
    testing.save_qwen3(root / "donor", seed=0)
    (root / "objects.toml").write_text(testing.registry_text())
    for step, source, target, inp, out in CHAIN:
        run_step(root, step, source, target, inp, out)
    return root


def drift_of(directory):
    return json.loads((directory / "drift.json").read_text())


def test_every_step_writes_a_complete_object_with_provenance_and_drift(chain):
    parent_hash = weights_sha256(chain / "donor")
    for step, source, target, inp, out in CHAIN:
        d = chain / out
        assert {p.name for p in d.iterdir()} == {"model.safetensors", "config.json", "provenance.json", "drift.json"}
        prov = read_provenance(d)
        assert prov["object"] == target and prov["step"] == step and prov["source"] == source
        assert prov["input_weights_sha256"] == parent_hash
        assert prov["weights_sha256"] == weights_sha256(d)
        assert prov["parents"][0]["object"] == source
        assert "/tmp" not in json.dumps(prov)  # no machine paths
        parent_hash = prov["weights_sha256"]
        report = drift_of(d)
        assert report["source"] == source and report["target"] == target
        assert report["reference"].startswith("source") and source in report["reference"]  # not the donor
        spans = report["metrics"]["spans"]
        assert spans["all"]["positions"] == sum(spans[s]["positions"] for s in ("none", "reasoning", "final"))
        assert spans["reasoning"]["positions"] > 0 and spans["final"]["positions"] > 0
        for key in ("kl_mean", "top1_agreement", "max_abs_dlogit"):
            assert key in spans["all"]


def test_surgery_records_selected_units_and_is_lossy(chain):
    prov = read_provenance(chain / "compat")
    units = prov["details"]["selected_units"]
    assert len(units) == 8 and all(len(u) == 32 and u == sorted(u) and len(set(u)) == 32 for u in units)
    assert all(0 <= i < 96 for u in units for i in u)
    assert drift_of(chain / "compat")["metrics"]["spans"]["all"]["max_abs_dlogit"] > 1e-2  # reported, not hidden


def test_morph_records_q_svd_error_per_local_layer(chain):
    numbers = drift_of(chain / "real")["step_numbers"]
    errors = numbers["q_svd_relative_error"]
    assert sorted(int(k) for k in errors) == [0, 1, 2, 4, 5, 6]  # local layers only (3, 7 are global)
    assert all(0 < e < 1 for e in errors.values())  # rank 4 of 8 heads: lossy, and recorded


@pytest.mark.parametrize("out", ["dense", "moe"])
def test_expand_and_granular_are_exact_on_the_calibration_batch(chain, out):
    spans = drift_of(chain / out)["metrics"]["spans"]["all"]
    assert spans["max_abs_dlogit"] < FP32_TOL
    assert spans["top1_agreement"] == 1.0
    assert spans["kl_mean"] < 1e-9


def test_expand_and_granular_logits_match_the_source_on_fresh_inputs(chain):
    """Independent of the drift code: real Harmony text (another seed) and random ids, with packed documents."""
    real, dense, moe = (load_model(chain / d) for d in ("real", "dense", "moe"))
    rows = calibration_rows(CalibrationSection(records=1, seed=77))
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.from_numpy(r.tokens.astype("int64"))[None], None) for r in rows]
    ids = torch.randint(0, 201088, (1, 200), generator=g)
    doc_ids = torch.zeros_like(ids)
    doc_ids[0, 90:] = 1
    inputs.append((ids, doc_ids))
    with torch.no_grad():
        for x, docs in inputs:
            want = real(x, doc_ids=docs).logits
            torch.testing.assert_close(dense(x, doc_ids=docs).logits, want, rtol=0, atol=0)  # bit-exact
            out = moe(x, doc_ids=docs)
            torch.testing.assert_close(out.logits, want, rtol=0, atol=FP32_TOL)
            assert out.routing_counts.sum() == 11 * 4 * x.numel()


def test_expand_records_the_layer_mapping(chain):
    details = read_provenance(chain / "dense")["details"]
    original = details["original"]
    assert [o for o in original if o is not None] == list(range(8))  # order kept
    assert original[0] == 0 and original[-1] == 7  # first and last layers stay first and last
    for t, s in enumerate(details["copy_of"]):
        assert (t + 1) % 4 == 0 if (s + 1) % 4 == 0 else (t + 1) % 4 != 0  # local/global kind kept


def test_granular_router_rows_are_replicated_and_no_ties(chain):
    moe = load_model(chain / "moe")
    w = moe.layers[1].mlp.router.weight
    assert torch.equal(w[0::4], w[1::4]) and torch.equal(w[0::4], w[3::4]) and not torch.equal(w[0], w[4])
    margins = drift_of(chain / "moe")["step_numbers"]["router_margins"]
    assert margins["router_near_ties"] == 0 and margins["min_gap"] > 0
    assert isinstance(moe.layers[0].mlp, torch.nn.Module) and not hasattr(moe.layers[0].mlp, "router")


def test_same_seed_same_bytes_other_seed_other_bytes_and_noise_is_recorded(chain, tmp_path):
    from vpmoe.upcycle import granular

    shutil.copy(chain / "objects.toml", tmp_path / "objects.toml")
    shutil.copytree(chain / "dense", tmp_path / "dense")
    extra = "[granular]\nnoise = 0.05"
    a = run_step(tmp_path, "granular", "vpDense", "vpMoE", "dense", "a", seed=3, records=1, extra=extra, name="a")
    b = run_step(tmp_path, "granular", "vpDense", "vpMoE", "dense", "b", seed=3, records=1, extra=extra, name="b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    report = drift_of(a)
    assert report["step_numbers"]["noise"] == 0.05
    stds = report["step_numbers"]["noise_std"]
    assert sorted(int(k) for k in stds) == list(range(1, 12)) and all(v["up"] > 0 for v in stds.values())
    assert report["metrics"]["spans"]["all"]["max_abs_dlogit"] > FP32_TOL  # noise drift is measured, not zero
    source = load_model(tmp_path / "dense")
    cfg = load_model(a).cfg
    same, _ = granular.convert(source, cfg, seed=3, noise=0.05)
    other, _ = granular.convert(source, cfg, seed=4, noise=0.05)
    saved = load_model(a).state_dict()
    assert all(torch.equal(t, saved[k]) for k, t in same.state_dict().items())
    assert not torch.equal(other.layers[1].mlp.experts.up, saved["layers.1.mlp.experts.up"])
    assert not torch.equal(other.layers[1].mlp.router.weight, saved["layers.1.mlp.router.weight"])


def test_surgery_output_is_deterministic(chain, tmp_path):
    shutil.copy(chain / "objects.toml", tmp_path / "objects.toml")
    shutil.copytree(chain / "donor", tmp_path / "donor")
    a = run_step(tmp_path, "surgery", "qwen3-0_6B-o200k", "vpDense0-5_28.compat", "donor", "a", seed=1, records=1,
                 name="a")
    assert (a / "model.safetensors").read_bytes() == (chain / "compat" / "model.safetensors").read_bytes()


def test_cli_upcycle_prints_where_it_wrote_and_refuses_an_existing_output(chain, tmp_path, capsys):
    shutil.copy(chain / "objects.toml", tmp_path / "objects.toml")
    shutil.copytree(chain / "real", tmp_path / "real")
    path = tmp_path / "expand.toml"
    path.write_text(testing.step_config_text("expand", "vpDense0-5_28.real", "vpDense", tmp_path / "real",
                                             tmp_path / "out", tmp_path / "objects.toml", records=1))
    assert main(["upcycle", str(path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["upcycle", str(path)]) == 2  # the output exists
    assert "exists" in capsys.readouterr().err
    assert main(["upcycle", str(path), "--set", "upcycle.overwrite=true"]) == 0


# ---- refusals: shapes, hashes, provenance -------------------------------------------------------------------------

def _refuse(root, step, source, target, inp, match, registry_text=None, name="refused"):
    from vpmoe.errors import UserError

    if registry_text is not None:
        (root / "objects.toml").write_text(registry_text)
    with pytest.raises(UserError, match=match):
        run_step(root, step, source, target, inp, f"out_{name}", records=1, name=name)
    assert not (root / f"out_{name}").exists()
    assert not [p for p in root.iterdir() if ".tmp" in p.name]  # no staging directory left behind


@pytest.fixture
def work(chain, tmp_path):
    shutil.copy(chain / "objects.toml", tmp_path / "objects.toml")
    shutil.copytree(chain / "real", tmp_path / "real")
    return tmp_path


def test_refuses_a_step_the_registry_does_not_name(work):
    _refuse(work, "morph", "vpDense0-5_28.real", "vpDense", "real", "made by step 'expand'")
    _refuse(work, "expand", "vpDense0-5_28.compat", "vpDense", "real", "from 'vpDense0-5_28.real'", name="r2")


def test_refuses_an_input_of_another_shape(work, chain):
    shutil.copytree(chain / "compat", work / "compat")
    _refuse(work, "expand", "vpDense0-5_28.real", "vpDense", "compat", "config.json differs")


def test_refuses_an_input_whose_provenance_names_another_object(work):
    prov = json.loads((work / "real" / "provenance.json").read_text())
    prov["object"] = "vpDense0-5_28.compat"
    (work / "real" / "provenance.json").write_text(json.dumps(prov))
    _refuse(work, "expand", "vpDense0-5_28.real", "vpDense", "real", "provenance says it is")


def test_refuses_an_input_without_provenance(work):
    (work / "real" / "provenance.json").unlink()
    _refuse(work, "expand", "vpDense0-5_28.real", "vpDense", "real", "no provenance.json")


def test_refuses_weights_changed_after_they_were_written(work):
    from safetensors.torch import load_file, save_file

    path = work / "real" / "model.safetensors"
    state = load_file(str(path))
    state["final_norm.weight"][0] += 1.0
    save_file(state, str(path), metadata={"format": "pt"})
    _refuse(work, "expand", "vpDense0-5_28.real", "vpDense", "real", "weights changed")


def test_refuses_weights_that_differ_from_a_registry_pin(work):
    digest = weights_sha256(work / "real")
    pinned = testing.registry_text(pins={"vpDense0-5_28.real": "0" * 64})
    _refuse(work, "expand", "vpDense0-5_28.real", "vpDense", "real", "registry pins", registry_text=pinned)
    (work / "objects.toml").write_text(testing.registry_text(pins={"vpDense0-5_28.real": digest}))
    run_step(work, "expand", "vpDense0-5_28.real", "vpDense", "real", "ok", records=1)  # the right pin passes


def test_refuses_a_donor_that_does_not_match_the_registry_facts(chain, tmp_path):
    shutil.copytree(chain / "donor", tmp_path / "donor")
    (tmp_path / "objects.toml").write_text(testing.registry_text(donor={"num_attention_heads": 8}))
    _refuse(tmp_path, "surgery", "qwen3-0_6B-o200k", "vpDense0-5_28.compat", "donor", "heads is 16")
    (tmp_path / "objects.toml").write_text(testing.registry_text(vocab=151936))
    _refuse(tmp_path, "surgery", "qwen3-0_6B-o200k", "vpDense0-5_28.compat", "donor", "vocab is 201088", name="v")
    (tmp_path / "objects.toml").write_text(testing.registry_text())
    cfg = json.loads((tmp_path / "donor" / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 10000.0
    (tmp_path / "donor" / "config.json").write_text(json.dumps(cfg))
    _refuse(tmp_path, "surgery", "qwen3-0_6B-o200k", "vpDense0-5_28.compat", "donor", "RoPE base", name="rope")


def test_steps_are_dispatched_from_the_table_of_step_objects(chain, tmp_path, monkeypatch):
    from vpmoe.upcycle import steps
    from vpmoe.upcycle.config import STEPS as STEP_NAMES

    assert list(steps.STEPS) == list(STEP_NAMES)
    assert all(callable(s.run) and callable(s.summary) and isinstance(s.numbers, tuple) for s in steps.STEPS.values())
    expand = steps.STEPS["expand"]
    calls = []

    class Recording:
        numbers = expand.numbers

        def run(self, ctx):
            calls.append((ctx.cfg.upcycle.step, ctx.staging.name.startswith(".out."), len(ctx.rows)))
            return expand.run(ctx)

        def summary(self, report):
            return "recorded"

    monkeypatch.setitem(steps.STEPS, "expand", Recording())
    shutil.copy(chain / "objects.toml", tmp_path / "objects.toml")
    shutil.copytree(chain / "real", tmp_path / "real")
    path = tmp_path / "expand.toml"
    path.write_text(testing.step_config_text("expand", "vpDense0-5_28.real", "vpDense", tmp_path / "real",
                                             tmp_path / "out", tmp_path / "objects.toml", records=1))
    out, summary = upcycle(load_upcycle_config(path))
    assert calls == [("expand", True, 1)] and summary == "recorded"
    assert drift_of(out)["step_numbers"]["new_layers"] == read_provenance(out)["details"]["new_layers"]


def test_morph_with_a_calibration_dataset_fits_blocks_and_records_their_errors(chain, tmp_path, synth_dataset):
    shutil.copy(chain / "objects.toml", tmp_path / "objects.toml")
    shutil.copytree(chain / "compat", tmp_path / "compat")
    extra = (f'[fit_data]\ndataset = "{synth_dataset.as_posix()}"\nfit_samples = 2\nheldout_samples = 1\n'
             f'max_tokens = 48\n[morph]\nsteps = 2\nrows_per_step = 1')
    out = run_step(tmp_path, "morph", "vpDense0-5_28.compat", "vpDense0-5_28.real", "compat", "real", records=1,
                   extra=extra)
    numbers = drift_of(out)["step_numbers"]
    assert numbers["method"] == "blockwise"
    fit = numbers["blockwise"]
    assert fit["fit_tokens"] == 2 * 48 and fit["heldout_tokens"] == 48 and "/tmp" not in fit["calibration"]
    assert [b["layer"] for b in fit["blocks"]] == list(range(8))
    for block in fit["blocks"]:
        err = block["rel_err"]
        assert set(err) == {"mapped", "init", "fit"} and block["kept"] in ("mapped", "fit")
        assert min(err["mapped"], err["fit"]) > 0
    # the mapped-only path (no calibration: method auto -> mapped) is what the chain fixture wrote
    assert drift_of(chain / "real")["step_numbers"]["method"] == "mapped"
    assert "blockwise" not in drift_of(chain / "real")["step_numbers"]
    kept_fit = [b["layer"] for b in fit["blocks"] if b["kept"] == "fit"]
    fitted, mapped = load_model(out).state_dict(), load_model(chain / "real").state_dict()
    for layer in range(8):
        same = all(torch.equal(fitted[k], mapped[k]) for k in fitted if k.startswith(f"layers.{layer}."))
        assert same == (layer not in kept_fit)


def test_healing_after_a_step_trains_the_object_and_reports_before_and_after(chain, tmp_path, synth_dataset):
    shutil.copy(chain / "objects.toml", tmp_path / "objects.toml")
    shutil.copytree(chain / "compat", tmp_path / "compat")
    heal_cfg = tmp_path / "heal.toml"
    heal_cfg.write_text("\n".join([
        "[run]", 'dir = "unused"', "[model]", 'config = "unused"', "[data]", f'path = "{synth_dataset.as_posix()}"',
        "[train]", "steps = 50", 'device = "cpu"', 'precision = "fp32"', "log_every = 1",
        "[optim]", "lr_matrix = 0.02", "lr_adam = 0.01", "warmup_steps = 1", "[checkpoint]", "every = 100", ""]))
    extra = f'[heal]\nconfig = "{heal_cfg.as_posix()}"\nsteps = 3\noverrides = ["optim.lr_adam=0.005"]'
    out = run_step(tmp_path, "morph", "vpDense0-5_28.compat", "vpDense0-5_28.real", "compat", "real", records=1,
                   extra=extra)
    report = drift_of(out)
    healing = report["healing"]
    assert healing["steps"] == 3 and healing["run_dir"].endswith("real.heal") and "/tmp" not in json.dumps(healing)
    for when in ("after_conversion", "after_healing"):
        assert set(healing[when]) == {"held_out_loss", "source_loss", "top1_agreement", "kl_mean"}
    assert healing["after_conversion"]["held_out_loss"] != healing["after_healing"]["held_out_loss"]
    assert report["metrics"]["spans"]["all"]["result_nll"] == healing["after_healing"]["held_out_loss"]
    # the object holds the healed weights: the healing run's last checkpoint, not the conversion (the mapped morph)
    healed, mapped = load_model(out), load_model(chain / "real")
    from_run = load_model(tmp_path / "real.heal")
    assert all(torch.equal(t, from_run.state_dict()[k]) for k, t in healed.state_dict().items())
    assert not torch.equal(healed.layers[0].attn.q_b.weight, mapped.layers[0].attn.q_b.weight)
    assert read_provenance(out)["details"]["healing"]["steps"] == 3
    # a second run refuses to reuse the healing run directory
    from vpmoe.errors import UserError

    with pytest.raises(UserError, match="healing run directory"):
        run_step(tmp_path, "morph", "vpDense0-5_28.compat", "vpDense0-5_28.real", "compat", "real2", records=1,
                 extra=extra.replace("steps = 3", f'steps = 3\nrun_dir = "{(tmp_path / "real.heal").as_posix()}"'),
                 name="again")
