"""Streamed conversions (steps 2 to 5 from disk to disk, one layer at a time): the same tensors as the in-memory
steps, drift measured block by block, and memory bounded by a layer, not by the model."""

import json
import shutil
import weakref

import pytest
import torch

from vpmoe.artifacts import weights
from vpmoe.artifacts.models import load_model, save_model
from vpmoe.model.transformer import build_model
from vpmoe.testing import upcycle as testing
from vpmoe.testing.models import model_config
from vpmoe.upcycle import expand, granular, stream
from vpmoe.upcycle.config import load_upcycle_config
from vpmoe.upcycle.drift import CalibrationSection, calibration_rows, drift_report, vpmoe_logits
from vpmoe.upcycle.run import upcycle


def _random_dense(layers=8, vocab=64):
    torch.manual_seed(0)
    model = build_model(model_config("tiny_dense", f"model.vocab_size={vocab}", f"model.n_layers={layers}"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases, sinks, logits, frequencies all nonzero
    return model


@pytest.mark.parametrize("step", ["expand", "granular"])
def test_streamed_step_writes_the_in_memory_tensors_bitwise(tmp_path, step):
    source = _random_dense(layers=4)
    save_model(source, tmp_path / "src")
    if step == "expand":
        cfg = model_config("tiny_dense", "model.vocab_size=64", "model.n_layers=12")
        want, _ = expand.convert(source, cfg)
        tensors = lambda reader, details: expand.target_tensors(reader.cfg, cfg, reader, details)  # noqa: E731
    else:
        cfg = model_config("tiny_moe", "model.vocab_size=64", "model.n_layers=4", "moe.n_experts=64")
        want, _ = granular.convert(source, cfg, seed=3, noise=0.1)
        tensors = lambda reader, details: granular.target_tensors(  # noqa: E731
            reader.cfg, cfg, reader, 3, 0.02, 0.1, details)
    reader = stream.Reader(tmp_path / "src")
    details = {}
    stream.write_streamed(tmp_path / "out", cfg, tensors(reader, details), shard_bytes=1 << 16)
    assert (tmp_path / "out" / weights.INDEX_FILE).is_file()  # sharded
    got = load_model(tmp_path / "out").state_dict()
    assert set(got) == set(want.state_dict())
    assert all(torch.equal(got[k], t) for k, t in want.state_dict().items())
    assert details["target_layers" if step == "expand" else "slices"]


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_surgery_and_morph_write_the_in_memory_tensors_bitwise(tmp_path, tied):
    """Step 2 from the donor's safetensors (tied and untied head) and step 3 from the compat object on disk give the
    tensors of the in-memory conversions, written sharded."""
    from vpmoe.upcycle import hf, morph, surgery
    from vpmoe.upcycle.registry import load_registry

    testing.save_qwen3(tmp_path / "donor", seed=2, tied=tied)
    (tmp_path / "objects.toml").write_text(testing.registry_text())
    registry = load_registry(tmp_path / "objects.toml")
    compat_cfg = registry.get("vpDense0-5_28.compat").model_config()
    real_cfg = registry.get("vpDense0-5_28.real").model_config()
    facts = hf.facts(tmp_path / "donor")
    state = {k: v.detach() for k, v in hf.load_causal_lm(tmp_path / "donor").state_dict().items()
             if k != hf.HEAD or facts["head_rows"]}
    compat, want_details = surgery.convert(state, facts, compat_cfg)
    details = {}
    stream.write_streamed(tmp_path / "compat", compat_cfg, surgery.target_tensors(
        facts, compat_cfg, hf.TensorReader(tmp_path / "donor"), details), shard_bytes=1 << 20)
    assert (tmp_path / "compat" / weights.INDEX_FILE).is_file()
    assert details == want_details and details["tied_donor_embeddings"] is tied
    got = load_model(tmp_path / "compat").state_dict()
    assert all(torch.equal(got[k], t) for k, t in compat.state_dict().items())
    if not tied:  # the untied donor's own head, not its embedding
        assert torch.equal(got["head.weight"], state[hf.HEAD])
        assert not torch.equal(got["head.weight"], got["embed.weight"])
    with torch.no_grad():
        for p in compat.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(compat, tmp_path / "compat2")
    real, want_details = morph.convert(compat, real_cfg, sink_init=-3.0, value_residual_init=-4.0)
    details = {}
    stream.write_streamed(tmp_path / "real", real_cfg, morph.target_tensors(
        compat_cfg, real_cfg, stream.Reader(tmp_path / "compat2"), details, -3.0, -4.0), shard_bytes=1 << 20)
    assert details == want_details
    got = load_model(tmp_path / "real").state_dict()
    assert set(got) == set(real.state_dict())
    assert all(torch.equal(got[k], t) for k, t in real.state_dict().items())


def test_streamed_forward_gives_the_models_logits(tmp_path):
    model = _random_dense(layers=8, vocab=201088)
    save_model(model, tmp_path / "m")
    rows = calibration_rows(CalibrationSection(records=2, seq_len=200))
    want = vpmoe_logits(model)
    got = stream.streamed_logits(stream.Reader(tmp_path / "m"), rows)
    for row in rows:
        ids = torch.from_numpy(row.tokens.astype("int64"))
        torch.testing.assert_close(got(ids), want(ids), rtol=0, atol=1e-5)  # same kernels, other matmul shapes


def test_streamed_conversion_holds_a_layer_not_the_model(tmp_path):
    """Every tensor read from the source or made by the step is tracked until it is freed: the peak of live bytes
    stays near one layer plus one shard, far below the model."""
    source = _random_dense(layers=24)
    save_model(source, tmp_path / "src")
    cfg = model_config("tiny_moe", "model.vocab_size=64", "model.n_layers=24", "moe.n_experts=64")
    live, peak = [0], [0]

    def track(tensor):  # a tensor tracked twice (read, then yielded as it is) counts twice: an upper bound
        nbytes = tensor.numel() * tensor.element_size()
        live[0] += nbytes
        peak[0] = max(peak[0], live[0])
        weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - nbytes))
        return tensor

    reader = stream.Reader(tmp_path / "src")
    read = lambda names: {n: track(t) for n, t in reader(names).items()}  # noqa: E731
    tensors = ((n, track(t)) for n, t in granular.target_tensors(source.cfg, cfg, read, 0, 0.02, 0.0, {}))
    layer_bytes = sum(t.numel() * 4 for n, t in build_model(cfg).state_dict().items() if n.startswith("layers.5."))
    total = sum(t.numel() * 4 for t in build_model(cfg).state_dict().values())
    shard = 2 * layer_bytes
    stream.write_streamed(tmp_path / "out", cfg, tensors, shard_bytes=shard)
    assert total > 20 * layer_bytes
    assert peak[0] <= shard + 3 * layer_bytes, (peak[0], layer_bytes, total)
    assert live[0] == 0  # everything freed at the end


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_chain")
    testing.save_qwen3(root / "donor", seed=0)
    (root / "objects.toml").write_text(testing.registry_text())
    steps = [("surgery", "qwen3-0_6B-o200k", "vpDense0-5_28.compat", "donor", "compat"),
             ("morph", "vpDense0-5_28.compat", "vpDense0-5_28.real", "compat", "real"),
             ("expand", "vpDense0-5_28.real", "vpDense", "real", "dense"),
             ("granular", "vpDense", "vpMoE", "dense", "moe")]
    for step, source, target, inp, out in steps:
        for streamed in (False, True):
            name = out + ("_streamed" if streamed else "")
            path = root / f"{name}.toml"
            path.write_text(testing.step_config_text(step, source, target, root / inp, root / name,
                                                     root / "objects.toml", records=2))
            overrides = ["upcycle.stream=true"] if streamed else []
            upcycle(load_upcycle_config(path, overrides))
    return root


@pytest.mark.parametrize("out", ["compat", "real", "dense", "moe"])
def test_streamed_chain_steps_match_the_in_memory_ones(chain, out):
    memory, streamed = chain / out, chain / f"{out}_streamed"
    assert (memory / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    a, b = (json.loads((d / "drift.json").read_text()) for d in (memory, streamed))
    for key in ("kl_mean", "top1_agreement", "max_abs_dlogit", "result_nll"):
        assert b["metrics"]["spans"]["all"][key] == pytest.approx(a["metrics"]["spans"]["all"][key], abs=1e-5)
    if out == "moe":
        assert b["step_numbers"]["router_margins"]["router_near_ties"] == 0
        assert b["step_numbers"]["router_margins"]["min_gap"] == pytest.approx(
            a["step_numbers"]["router_margins"]["min_gap"], rel=1e-4)


def test_streamed_bf16_weights_load_and_stay_close(chain, tmp_path):
    shutil.copy(chain / "objects.toml", tmp_path / "objects.toml")
    shutil.copytree(chain / "dense", tmp_path / "dense")
    path = tmp_path / "g.toml"
    path.write_text(testing.step_config_text("granular", "vpDense", "vpMoE", tmp_path / "dense", tmp_path / "moe",
                                             tmp_path / "objects.toml", records=1))
    out, _ = upcycle(load_upcycle_config(path, ["upcycle.stream=true", "upcycle.dtype=bf16"]))
    assert {str(t.dtype) for _, t in weights.iter_tensors(out)} == {"torch.bfloat16", "torch.float32"}
    fp32 = {n for n, t in weights.iter_tensors(out) if t.dtype == torch.float32}
    assert fp32 and all(n.endswith(("grape_log_freq", "expert_bias")) for n in fp32)
    moe = load_model(out)
    assert json.loads((out / "provenance.json").read_text())["details"]["streamed"] == {"dtype": "bf16"}
    rows = calibration_rows(CalibrationSection(records=1))
    report = drift_report(vpmoe_logits(load_model(chain / "dense")), vpmoe_logits(moe), rows)
    assert report["spans"]["all"]["top1_agreement"] > 0.9  # bf16 rounding of the weights only


def test_stream_is_refused_where_it_does_not_apply(tmp_path):
    from vpmoe.errors import UserError

    path = tmp_path / "m.toml"
    path.write_text(testing.step_config_text("transplant", "qwen3-0_6B", "qwen3-0_6B-o200k", tmp_path,
                                             tmp_path / "o", tmp_path / "objects.toml"))
    with pytest.raises(UserError, match="stream covers steps"):
        load_upcycle_config(path, ["upcycle.stream=true"])
    path.write_text(testing.step_config_text("morph", "vpDense0-5_28.compat", "vpDense0-5_28.real", tmp_path,
                                             tmp_path / "o", tmp_path / "objects.toml"))
    with pytest.raises(UserError, match="needs upcycle.stream"):
        load_upcycle_config(path, ["upcycle.dtype=bf16"])
    load_upcycle_config(path, ["upcycle.stream=true", "morph.method=blockwise", "fit_data.dataset=d"])  # streams
    path.write_text(testing.step_config_text("surgery", "qwen3-0_6B-o200k", "vpDense0-5_28.compat", tmp_path,
                                             tmp_path / "o", tmp_path / "objects.toml"))
    load_upcycle_config(path, ["upcycle.stream=true", "surgery.method=fit"])  # streams


def _tiny_compat_on_disk(tmp_path, n_rows):
    """A tiny compat model (all parameters perturbed) saved to tmp_path/compat, the real config it morphs to and
    n_rows calibration rows of 40 tokens."""
    import numpy as np

    from vpmoe.upcycle.drift import CalibrationRow

    geometry = ["model.n_layers=4", "attention.n_heads=8", "attention.n_kv_heads=2", "attention.head_dim=8",
                "model.vocab_size=64"]
    torch.manual_seed(0)
    compat = build_model(model_config("tiny_compat", *geometry))
    with torch.no_grad():
        for p in compat.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(compat, tmp_path / "compat")
    cfg = model_config("tiny_real", *geometry, "attention.tpa_q_rank=2", "attention.window=32")
    g = np.random.default_rng(1)
    return compat, cfg, [CalibrationRow(g.integers(0, 64, 40).astype(np.int32), np.ones(40, np.uint8))
                         for _ in range(n_rows)]


@pytest.mark.parametrize("lr,kept", [(1e-3, "fit"), (2e-2, "mapped")])  # lr 2e-2: the fit hurts every block
def test_streamed_blockwise_morph_fits_the_in_memory_tensors_bitwise(tmp_path, lr, kept):
    """The block-wise morph from the compat object on disk (one compat and one real block at a time, the compat
    activations computed block by block from the embedding) gives the in-memory fit's tensors and per-block errors
    bitwise: both run blockfit.BlockWalk on the same fp32 tensors in the same order."""
    import copy

    from vpmoe.upcycle import blockfit, morph

    compat, cfg, rows = _tiny_compat_on_disk(tmp_path, n_rows=10)
    fit, held = rows[:8], rows[8:]
    settings = blockfit.FitSettings(steps=20 if kept == "fit" else 6, lr=lr, rows_per_step=2)
    mapped, want_details = morph.convert(compat, cfg)
    real = copy.deepcopy(mapped)
    want_details["blockwise"] = blockfit.fit_blocks(compat, real, fit, held, settings)
    reader = stream.Reader(tmp_path / "compat")
    details = {}
    tensors = blockfit.streamed_tensors(reader, cfg, morph.target_tensors(reader.cfg, cfg, reader, details), fit,
                                        held, settings, details)
    stream.write_streamed(tmp_path / "real", cfg, tensors, shard_bytes=1 << 16)
    assert (tmp_path / "real" / weights.INDEX_FILE).is_file()
    assert details == want_details  # every block's mapped / init / fit error, bitwise
    assert {b["kept"] for b in details["blockwise"]["blocks"]} == {kept}
    got = load_model(tmp_path / "real").state_dict()
    assert set(got) == set(real.state_dict())
    assert all(torch.equal(got[k], t) for k, t in real.state_dict().items())
    changed = {k.split(".")[1] for k, t in real.state_dict().items() if not torch.equal(t, mapped.state_dict()[k])}
    assert changed == ({"0", "1", "2", "3"} if kept == "fit" else set())


def _in_memory_and_streamed(chain, tmp_path, dataset, step, source, target, source_dir, section) -> dict:
    """`vpmoe upcycle` of one step with [fit_data] on the tiny chain, in memory and streamed: {streamed: output}."""
    shutil.copy(chain / "objects.toml", tmp_path / "objects.toml")
    extra = (f'[fit_data]\ndataset = "{dataset.as_posix()}"\nfit_samples = 2\nheldout_samples = 1\n'
             f'max_tokens = 32\n{section}')
    outs = {}
    for streamed in (False, True):
        name = f"{step}_streamed" if streamed else step
        path = tmp_path / f"{name}.toml"
        path.write_text(testing.step_config_text(step, source, target, chain / source_dir, tmp_path / name,
                                                 tmp_path / "objects.toml", records=1, extra=extra))
        outs[streamed], _ = upcycle(load_upcycle_config(path, ["upcycle.stream=true"] if streamed else []))
    return outs


def test_streamed_blockwise_morph_step_matches_the_in_memory_one(chain, tmp_path, synth_dataset):
    """`vpmoe upcycle` step 3 with [fit_data] and upcycle.stream: the object and the per-block errors of drift.json
    are those of the in-memory block-wise morph."""
    outs = _in_memory_and_streamed(chain, tmp_path, synth_dataset, "morph", "vpDense0-5_28.compat",
                                   "vpDense0-5_28.real", "compat", "[morph]\nsteps = 2\nrows_per_step = 1")
    a, b = (json.loads((outs[s] / "drift.json").read_text()) for s in (False, True))
    assert b["step_numbers"]["method"] == a["step_numbers"]["method"] == "blockwise"
    assert b["step_numbers"]["blockwise"] == a["step_numbers"]["blockwise"]
    assert [e["layer"] for e in b["step_numbers"]["blockwise"]["blocks"]] == list(range(8))
    for key in ("kl_mean", "top1_agreement", "max_abs_dlogit", "result_nll"):
        assert b["metrics"]["spans"]["all"][key] == pytest.approx(a["metrics"]["spans"]["all"][key], abs=1e-5)
    want, got = load_model(outs[False]).state_dict(), load_model(outs[True]).state_dict()
    assert all(torch.equal(got[k], t) for k, t in want.items())


def test_streamed_router_fit_gives_the_in_memory_tensors_bitwise(tmp_path):
    """granular.fit_router from the dense object on disk (one dense and one MoE block at a time) gives the in-memory
    fit's tensors and per-layer errors bitwise: both run granular.RouterWalk on the same fp32 tensors."""
    import numpy as np

    from vpmoe.upcycle.drift import CalibrationRow

    source = _random_dense(layers=4)
    save_model(source, tmp_path / "src")
    cfg = model_config("tiny_moe", "model.vocab_size=64", "model.n_layers=4", "moe.n_experts=64")
    g = np.random.default_rng(1)
    rows = [CalibrationRow(g.integers(0, 64, 40).astype(np.int32), np.ones(40, np.uint8)) for _ in range(6)]
    fit, held = rows[:4], rows[4:]
    want, want_details = granular.convert(source, cfg, seed=3, noise=0.5)
    random_rows = {k: t.clone() for k, t in want.state_dict().items()}
    want_details["router_fit"] = granular.fit_router(source, want, fit, held, want_details["slices"], 30, 0.05)
    reader = stream.Reader(tmp_path / "src")
    details = {}
    tensors = granular.target_tensors(reader.cfg, cfg, reader, 3, 0.02, 0.5, details)
    stream.write_streamed(tmp_path / "out", cfg, granular.streamed_tensors(
        reader, cfg, tensors, fit, held, granular.check_geometry(reader.cfg, cfg), 30, 0.05, details),
        shard_bytes=1 << 16)
    assert details == want_details
    layers = details["router_fit"]["layers"]
    assert sorted(int(k) for k in layers) == cfg.moe_layers and {e["kept"] for e in layers.values()} == {"fit"}
    got = load_model(tmp_path / "out").state_dict()
    assert set(got) == set(want.state_dict())
    assert all(torch.equal(got[k], t) for k, t in want.state_dict().items())
    changed = {k for k, t in got.items() if not torch.equal(t, random_rows[k])}
    assert changed == {f"layers.{layer}.mlp.router.weight" for layer in cfg.moe_layers}  # only the routers moved


def test_streamed_granular_with_router_fit_matches_the_in_memory_step(chain, tmp_path, synth_dataset):
    outs = _in_memory_and_streamed(chain, tmp_path, synth_dataset, "granular", "vpDense", "vpMoE", "dense",
                                   "[granular]\nnoise = 0.3\nfit_router = true\nrouter_fit_steps = 5")
    a, b = (json.loads((outs[s] / "drift.json").read_text()) for s in (False, True))
    assert b["step_numbers"]["router_fit"] == a["step_numbers"]["router_fit"]
    assert len(b["step_numbers"]["router_fit"]["layers"]) == len(load_model(outs[True]).moe_layers)
    assert b["step_numbers"]["router_margins"]["min_gap"] == pytest.approx(
        a["step_numbers"]["router_margins"]["min_gap"], rel=1e-4)
    for key in ("kl_mean", "top1_agreement", "max_abs_dlogit", "result_nll"):
        assert b["metrics"]["spans"]["all"][key] == pytest.approx(a["metrics"]["spans"]["all"][key], abs=1e-5)
    want, got = load_model(outs[False]).state_dict(), load_model(outs[True]).state_dict()
    assert all(torch.equal(got[k], t) for k, t in want.items())


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_surgery_fit_gives_the_in_memory_tensors_bitwise(tmp_path, tied):
    """Step 2 method "fit" from the donor's safetensors (one donor layer loaded into a meta-device skeleton at a
    time) gives the in-memory fit's tensors and per-layer errors bitwise: both run surgery.DonorWalk and FitWalk."""
    from vpmoe.upcycle import hf, surgery
    from vpmoe.upcycle.registry import load_registry

    testing.save_qwen3(tmp_path / "donor", seed=2, tied=tied)
    (tmp_path / "objects.toml").write_text(testing.registry_text())
    cfg = load_registry(tmp_path / "objects.toml").get("vpDense0-5_28.compat").model_config()
    rows = calibration_rows(CalibrationSection(records=2), seed=99, prefix="fit")
    facts = hf.facts(tmp_path / "donor")
    donor = hf.load_causal_lm(tmp_path / "donor")
    state = {k: v.detach() for k, v in donor.state_dict().items() if k != hf.HEAD or facts["head_rows"]}
    want, want_details = surgery.convert(state, facts, cfg, "fit", donor=donor, fit_rows=rows, ridge=1e-3)
    mean, _ = surgery.convert(state, facts, cfg)
    details = {}
    tensors = surgery.target_tensors(facts, cfg, hf.TensorReader(tmp_path / "donor"), details)
    stream.write_streamed(tmp_path / "compat", cfg, surgery.streamed_fit_tensors(
        tmp_path / "donor", cfg, tensors, rows, 1e-3, details), shard_bytes=1 << 20)
    assert details == want_details and details["method"] == "fit"
    assert len(details["fit"]["layers"]) == cfg.model.n_layers
    got = load_model(tmp_path / "compat").state_dict()
    assert all(torch.equal(got[k], t) for k, t in want.state_dict().items())
    changed = {k for k, t in got.items() if not torch.equal(t, mean.state_dict()[k])}
    assert changed == {f"layers.{i}.{n}.weight" for i in range(cfg.model.n_layers)
                       for n in ("attn.o_proj", "mlp.down")}
    # the donor's residual stream walked layer by layer is its own forward's (hidden states of the full model)
    out = donor(input_ids=torch.from_numpy(rows[0].tokens.astype("int64"))[None], output_hidden_states=True)
    states = surgery.donor_residual_states(donor, rows[:1])[0]
    last = cfg.model.n_layers - 1  # HF's last hidden state is after the final norm
    with torch.no_grad():
        walked = [*states[1][:last], donor.model.norm(states[1][last])]
    for layer in range(cfg.model.n_layers):
        torch.testing.assert_close(walked[layer], out.hidden_states[layer + 1][0], rtol=0, atol=1e-5)


def test_a_calibration_record_too_long_for_seq_len_is_refused_by_name():
    from vpmoe.errors import UserError
    with pytest.raises(UserError, match=r"calibration record calibration-\d+-00000000 cannot be rendered in "
                                        r"calibration.seq_len = 16 tokens"):
        calibration_rows(CalibrationSection(records=2, seq_len=16))


class _Float64Reader(stream.Reader):
    def __call__(self, names):
        return {name: t.double() for name, t in super().__call__(names).items()}


def test_streamed_parallel_block_fits_give_the_serial_fit(tmp_path):
    """The streamed block-wise morph with morph.workers = 2 yields the serial stream's tensors, in its order, and
    the same per-block report: run in float64 (the reader's tensors and the default dtype of the blocks it
    builds), so that last-bit differences across processes stay far below the tolerance."""
    from vpmoe.model.transformer import FP32_NAMES
    from vpmoe.upcycle import blockfit, morph

    _, cfg, rows = _tiny_compat_on_disk(tmp_path, n_rows=6)
    settings = blockfit.FitSettings(steps=5, lr=1e-3, rows_per_step=2)
    reader = _Float64Reader(tmp_path / "compat")
    runs = {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for workers in (1, 2):
            details = {}
            tensors = blockfit.streamed_tensors(reader, cfg, morph.target_tensors(reader.cfg, cfg, reader, details),
                                                rows[:4], rows[4:], settings, details, workers=workers)
            runs[workers] = list(tensors), details
    finally:
        torch.set_default_dtype(default)
    (want, want_details), (got, got_details) = runs[1], runs[2]
    assert [n for n, _ in got] == [n for n, _ in want]
    assert {t.dtype for n, t in got if not n.endswith(FP32_NAMES)} == {torch.float64}  # (GRAPE-M stays fp32)
    want_blocks, got_blocks = want_details.pop("blockwise"), got_details.pop("blockwise")
    assert got_details == want_details  # the mapping's own details
    assert (want_blocks.pop("workers"), got_blocks.pop("workers")) == (1, 2)
    assert {e["kept"] for e in got_blocks["blocks"][1:]} == {"fit"}
    for a, b in zip(want_blocks.pop("blocks"), got_blocks.pop("blocks"), strict=True):
        assert (b["layer"], b["kept"], b["trained"]) == (a["layer"], a["kept"], a["trained"])
        for k in a["rel_err"]:
            assert b["rel_err"][k] == pytest.approx(a["rel_err"][k], rel=1e-10, abs=0)
    assert got_blocks == want_blocks
    diff = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)) for (_, a), (_, b) in zip(want, got))
    assert diff <= 1e-10
