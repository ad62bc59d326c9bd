"""Performance tooling on the CPU: the micro-batch search, accumulation plans, synthetic batches, step measurement
through the real trainer, the profile command and its errors. (GPU figures come from benchmarks/train_step.py.)"""

import json

import pytest
import torch

from vpmoe import cli
from vpmoe.distributed import Ranks
from vpmoe.errors import UserError
from vpmoe.model import positions_from_doc_ids
from vpmoe.model.config import load_model_config
from vpmoe.perf.autotune import accumulation_plan, largest_fitting
from vpmoe.perf.measure import measure, set_micro_batch, synthetic_trainer
from vpmoe.perf.synthetic import SyntheticBatches
from vpmoe.train.config import load_train_config
from vpmoe.train.timing import PhaseTimer
from vpmoe.train.trainer import Trainer

TINY = "configs/train/tiny_ce.toml"
SMALL = ["data.seq_len=64", "train.steps=100"]
SMALL_MODEL = load_model_config("tiny_moe", ["model.n_layers=3", "model.vocab_size=256"])


@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 7, 8, 13, 50, 64])
def test_largest_fitting_finds_the_threshold_with_few_trials(threshold):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= threshold

    assert largest_fitting(fits, limit=64) == min(threshold, 64)
    assert len(tried) == len(set(tried)) <= 14  # doubling, then bisection; never the same size twice


def test_accumulation_plan_reaches_the_target_exactly():
    assert accumulation_plan(4, 256, 8) == (4, 8)
    assert accumulation_plan(5, 256, 8) == (4, 8)  # 5 does not divide the per-rank 32 sequences
    assert accumulation_plan(64, 16, 1) == (16, 1)
    micro, accum = accumulation_plan(3, 30, 2)
    assert micro * accum * 2 == 30 and micro <= 3
    with pytest.raises(UserError, match="does not split over 3 ranks"):
        accumulation_plan(4, 256, 3)


def test_synthetic_batches_look_like_the_loaders():
    batches = SyntheticBatches(vocab_size=50, seq_len=32, micro_batch_size=3, seed=1, docs_per_row=3)
    batch = next(batches)
    assert batch.input_ids.shape == batch.labels.shape == batch.label_spans.shape == (3, 32)
    assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])
    assert torch.equal(batch.position_ids, positions_from_doc_ids(batch.doc_ids))
    assert (batch.doc_ids[:, -1] == 2).all() and (batch.doc_ids.diff(dim=1) >= 0).all()
    assert set(batch.label_spans.unique().tolist()) == {1, 2}  # every label supervised, both spans present
    assert next(batches).sample_index.tolist() == [3, 4, 5]
    again = next(SyntheticBatches(50, 32, 3, seed=1, docs_per_row=3))
    assert torch.equal(again.input_ids, batch.input_ids)


def test_phase_timer_sums_each_phase_and_resets_on_read():
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.phase("forward"):
            sum(range(10000))
    first = timer.read()
    assert set(first) == {"forward"} and first["forward"] > 0
    assert timer.read() == {}


class Clock:
    """`time` for the measuring module: perf_counter() returns the given instants, in order."""

    def __init__(self, *instants):
        self.instants = list(instants)

    def perf_counter(self):
        return self.instants.pop(0)


def test_measure_runs_the_real_training_step(monkeypatch):
    from vpmoe.perf import measure as measure_module

    cfg = load_train_config(TINY, SMALL)
    trainer = synthetic_trainer(cfg, SMALL_MODEL)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # The timed steps took 1.0, 1.0 and 2.0 s by this clock: 3 steps of 1 x 64 tokens in 4 s -> 48 tokens/s,
    # 1333.3 ms per step on average, 1000 ms the median step.
    monkeypatch.setattr(measure_module, "time", Clock(100.0, 100.0, 101.0, 101.0, 102.0, 102.0, 104.0, 104.0))
    result = measure(trainer, warmup=1, steps=3)
    assert trainer.global_step == 4  # the optimizer stepped every time
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "head.weight" in changed and "layers.1.mlp.experts.up" in changed
    ms = result["step_ms"]
    assert {"forward", "backward", "optimizer", "total", "median", "other"} <= set(ms)
    assert ms["forward"] > 0 and ms["backward"] > 0 and ms["optimizer"] > 0
    assert result["tokens_per_s"] == pytest.approx(3 * 1 * 64 / 4.0, rel=1e-12)  # micro-batch 1, no accumulation
    assert ms["total"] == pytest.approx(4000.0 / 3, abs=0.005) and ms["median"] == 1000.0  # rounded to 0.01 ms
    assert ms["other"] == pytest.approx(4000.0 / 3 - ms["forward"] - ms["backward"] - ms["optimizer"], abs=0.02)
    assert result["n_layers"] == 3 and result["router"]["experts_active_mean"] > 0
    set_micro_batch(trainer, 2, grad_accum=2)
    assert next(trainer.data).input_ids.shape == (2, 64) and trainer.cfg.data.grad_accum == 2


def test_a_kd_config_is_measured_as_its_ce_stage():
    trainer = synthetic_trainer(load_train_config("configs/train/tiny_kd.toml", SMALL), SMALL_MODEL)
    assert trainer.objective.name == "ce" and trainer.cfg.train.stage == "ce" and trainer.cfg.loss.kd == 0
    online = synthetic_trainer(load_train_config("tiny_kd_online", SMALL), SMALL_MODEL)
    assert online.objective.name == "ce" and online.cfg.teacher is None and online.cfg.distill is None


def test_profile_writes_a_summary_json(tmp_path, capsys):
    out = tmp_path / "perf" / "profile.json"
    args = ["profile", TINY, "--out", str(out), "--warmup", "1", "--steps", "1", "--profiled-steps", "1",
            *(f"--set={o}" for o in SMALL)]
    assert cli.main(args) == 0
    summary = json.loads(out.read_text())
    assert summary["provenance"]["kind"] == "perf_profile"
    for key in ("top_operators", "top_operators_forward_backward"):
        rows = summary[key]
        assert rows and all(row["ms_per_step"] >= 0 for row in rows)
        assert sum(row["share_pct"] for row in rows) <= 100.01
    assert "tokens/s" in capsys.readouterr().out


def test_bad_arguments_exit_2(capsys):
    assert cli.main(["profile", TINY, "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert cli.main(["autotune", TINY, "--world-size", "0"]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["autotune", TINY]) == 2
        assert "needs CUDA" in capsys.readouterr().err


def test_cuda_graph_compile_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(UserError, match="does not combine with train.activation_checkpointing"):
        load_train_config(TINY, [*SMALL, "train.compile=cudagraphs", "train.activation_checkpointing=true"])
    with pytest.raises(UserError, match="train.compile"):
        load_train_config(TINY, [*SMALL, "train.compile=sometimes"])
    cfg = load_train_config(TINY, [*SMALL, "train.compile=cudagraphs", "train.device=cpu"])
    with pytest.raises(UserError, match="needs CUDA"):
        synthetic_trainer(cfg, SMALL_MODEL)
    two_ranks = Ranks(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(UserError, match="one GPU only"):
        Trainer(cfg, two_ranks, SyntheticBatches(256, 64, 1), SMALL_MODEL, 64)


def test_profile_components_table_adds_up_to_the_step():
    from vpmoe.perf.profile import component_of, components

    names = {
        "triton_tem_fused__to_copy_flex_attention_backward_mul_sigmoid_29": "attention",
        "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13GemmUniversalINS5_"
        "17GroupProblemShapeIN4cute5tupleIJiiiEEEEENS5_10collec": "expert GEMMs",
        "nvjet_sm90_tst_256x128_64x4_2x1_v_bz_coopA_NNT": "dense GEMMs",
        "triton_per_fused_add_mul_rsqrt_3": "compiled elementwise",
        "void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<float>": "eager elementwise",
    }
    assert {k: component_of(k) for k in names} == names
    model = {"attention": 30.0, "expert GEMMs": 20.0, "dense GEMMs": 40.0, "compiled elementwise": 5.0,
             "eager elementwise": 5.0}
    step = {k: v for k, v in model.items()} | {"eager elementwise": 45.0}  # + 40 ms of optimizer kernels
    flops = {"attention": 3e9, "experts": 1e9, "dense": 8e9}
    rows = {r["component"]: r for r in components(step, model, flops, 1000, 160.0, 500.0)}
    assert rows["optimizer"]["ms_per_step"] == 40.0 and rows["host gap (GPU idle)"]["ms_per_step"] == 20.0
    assert sum(r["ms_per_step"] for r in rows.values()) == 160.0
    assert rows["dense GEMMs"]["share_pct"] == 25.0
    assert rows["attention"]["tflops"] == 100.0 and rows["attention"]["pct_of_matmul_rate"] == 20.0  # 3e12 / 0.03 s
    assert rows["expert GEMMs"]["tflops"] == 50.0 and "tflops" not in rows["optimizer"]


def test_flops_split_counts_the_routed_experts_from_the_config():
    from vpmoe.model.config import load_model_config
    from vpmoe.train.flops import train_flops_per_token, train_flops_split

    cfg = load_model_config("vpMoE")
    split = train_flops_split(cfg, 2048)
    assert sum(split.values()) == train_flops_per_token(cfg, 2048)
    # routed experts from the config alone: top_k experts of up [width, D] + down [D, width] per MoE layer, 6 FLOPs
    # per weight (forward 2, backward 4)
    m = cfg.moe
    assert split["experts"] == 6 * len(cfg.moe_layers) * m.topk * 2 * m.expert_width * cfg.model.hidden_size
