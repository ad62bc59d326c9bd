"""Stage kd_online (vpmoe/train/objectives/kd_online.py): its terms against float64 references, its masks, the
teacher = student limit, ranks and resume, and its refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from vpmoe import config as config_io
from vpmoe.artifacts import checkpoints
from vpmoe.artifacts.models import save_model
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.distributed import Ranks
from vpmoe.export import export
from vpmoe.model import build_model
from vpmoe.model.config import load_model_config
from vpmoe.testing.teachers import save_tiny_teacher
from vpmoe.train import losses
from vpmoe.train.config import load_train_config
from vpmoe.train.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_online_data")
    src = synthetic.write_jsonl(root / "src.jsonl", synthetic.records(8, seed=5))
    return build(DataSection(inputs=[str(src)], format="synth", out=str(root / "ds"), seq_len=256, pack=True,
                             valid_fraction=0.0))


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("kd_online_teacher") / "gpt_oss", seed=4)


@pytest.fixture(scope="module")
def student_init(tmp_path_factory):
    """The tiny student's initial weights as a checkpoint object (the student starts from it, the teacher can be it)."""
    torch.manual_seed(0)
    return save_model(build_model(load_model_config("tiny_moe")), tmp_path_factory.mktemp("kd_online_init") / "init")


def config(tmp_path, dataset, teacher, name="run", **sets):
    overrides = [f"data.path={json.dumps(str(dataset))}", f"run.dir={json.dumps(str(tmp_path / name))}",
                 f"teacher.path={json.dumps(str(teacher))}", "data.seq_len=256", "train.log_every=1",
                 "optim.warmup_steps=1"]
    overrides += [f"{k.replace('__', '.')}={json.dumps(v)}" for k, v in sets.items()]
    return load_train_config("tiny_kd_online", overrides)


def first_loss(cfg):
    """The objective, the model, the first micro-batch and its loss output (the step's counts are its own)."""
    trainer = Trainer.from_config(cfg, Ranks())
    batch = trainer.objective.batches(trainer.data, 1)[0]
    counts = losses.span_counts(batch.rows.label_spans)
    return trainer.objective, trainer.model, batch, counts, trainer.objective.loss(trainer.model, batch, counts)


def span_normalized64(values, spans, counts, weights=(0.0, 1.0, 1.0)):
    w = torch.tensor(weights, dtype=torch.float64)
    sums = torch.zeros(len(w), dtype=torch.float64).index_add(0, spans, values)
    return (w * sums / counts.clamp(min=1).double()).sum()


@pytest.mark.parametrize("chunk", [1, 8, 100000])
def test_chunked_kl_and_its_gradient_equal_a_float64_full_softmax(tmp_path, dataset, hf_teacher, chunk):
    cfg = config(tmp_path, dataset, hf_teacher, distill__ce=0.0, distill__kl=1.0, distill__hidden=0.0,
                 distill__hidden_final=0.0, distill__temperature=2.0, distill__kl_chunk_tokens=chunk)
    objective, model, batch, counts, out = first_loss(cfg)
    rows, states = batch.rows, batch.teacher_states
    mask = rows.label_spans > 0
    assert chunk in (1, 100000) or mask.sum() % chunk != 0  # a last chunk that is not full
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.terms["kl"], params, allow_unused=True)

    # float64 reference: the full [N, V] softmax of both models at T = 2, T^2 * KL(p_T || p_S), span means
    logits = model(rows.input_ids, rows.position_ids, rows.doc_ids, logits_at=mask).logits.double()
    teacher_logits = states.hidden.double() @ objective.teacher.head_weight.double().T
    log_s, log_t = F.log_softmax(logits / 2.0, -1), F.log_softmax(teacher_logits / 2.0, -1)
    kl = 4.0 * (log_t.exp() * (log_t - log_s)).sum(-1)
    reference = span_normalized64(kl, rows.label_spans[mask], counts)
    expected = torch.autograd.grad(reference, params, allow_unused=True)
    # fp32 logits (chunk by chunk vs all at once) under float64 softmax math: 1e-5 relative is float32 rounding
    assert out.terms["kl"].item() == pytest.approx(reference.item(), rel=1e-5)
    assert reference.item() > 0.01
    # atol from the largest gradient: a scalar parameter's gradient is an fp32 sum of cancelling terms, whose
    # rounding follows the terms' size, not the sum's (2e-4 relative seen on a 7e-7 gradient)
    scale = max(w.abs().max().item() for w in expected if w is not None)
    for p, got, want in zip(params, grads, expected):
        if want is None:
            assert got is None or not got.any()
            continue
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4,
                                   atol=max(1e-4 * want.abs().max().item(), 1e-6 * scale))


def test_a_teacher_equal_to_the_student_gives_zero_kl_and_identity_projections_zero_hidden(
        tmp_path, dataset, student_init):
    cfg = config(tmp_path, dataset, student_init, model__init_from=str(student_init), distill__ce=0.0,
                 distill__layer_pairs=[[1, 1], [4, 4], [7, 7]], distill__hidden_final=0.25, teacher__dtype="float32")
    trainer = Trainer.from_config(cfg, Ranks())
    objective = trainer.objective
    with torch.no_grad():
        for proj in objective.projections.proj:
            proj.weight.copy_(torch.eye(proj.weight.shape[0]))
    objective.initialized = True
    batch = objective.batches(trainer.data, 1)[0]
    counts = losses.span_counts(batch.rows.label_spans)
    out = objective.loss(trainer.model, batch, counts)
    assert counts[1:].sum() > 0
    assert abs(out.terms["kl"].item()) <= 1e-6
    assert abs(out.terms["hidden"].item()) <= 1e-6
    assert out.span_sums["ce"].sum() > 0  # CE is logged although its weight is 0


def test_the_teacher_counts_only_at_positions_that_predict_a_supervised_token(tmp_path, dataset, student_init):
    cfg = config(tmp_path, dataset, student_init, distill__ce=0.0, distill__hidden=0.0, distill__hidden_final=0.0,
                 teacher__dtype="float32")
    trainer = Trainer.from_config(cfg, Ranks())
    objective = trainer.objective
    data_state = trainer.data.state_dict()

    def loss_with_teacher_perturbed_at(position):
        trainer.data.load_state_dict(data_state)
        norm = objective.teacher.model.final_norm

        def perturb(_module, _args, output):
            if position is None:
                return output
            output = output.clone()
            output[0, position] += 3.0
            return output

        handle = norm.register_forward_hook(perturb)
        try:
            batch = objective.batches(trainer.data, 1)[0]
        finally:
            handle.remove()
        counts = losses.span_counts(batch.rows.label_spans)
        with torch.no_grad():
            return objective.loss(trainer.model, batch, counts).loss, batch.rows.label_spans[0]

    base, spans = loss_with_teacher_perturbed_at(None)
    first = int((spans > 0).nonzero()[0])  # position `first` predicts the first supervised token
    assert first > 0 and spans[first - 1] == 0
    unsupervised, _ = loss_with_teacher_perturbed_at(first - 1)
    supervised, _ = loss_with_teacher_perturbed_at(first)
    assert torch.equal(unsupervised, base)
    assert abs(supervised.item() - base.item()) > 1e-3


def test_kd_online_kl_equals_kd_offline_kl_when_the_sidecar_holds_the_teacher_distribution(
        tmp_path, dataset, hf_teacher):
    """kd_offline's term (losses.topk_kl: top-K + tail bucket, span-normalized) on a sidecar that holds the teacher's
    whole distribution (K = V - 1: the tail bucket is the one token left) equals kd_online's chunked KL."""
    cfg = config(tmp_path, dataset, hf_teacher, distill__ce=0.0, distill__kl=1.0, distill__hidden=0.0,
                 distill__hidden_final=0.0, distill__kl_chunk_tokens=16)
    objective, model, batch, counts, out = first_loss(cfg)
    rows, states = batch.rows, batch.teacher_states
    mask = rows.label_spans > 0
    with torch.no_grad():
        teacher_logprobs = F.log_softmax(states.hidden @ objective.teacher.head_weight.T, -1)
        top = teacher_logprobs.topk(teacher_logprobs.shape[1] - 1, dim=-1)
        logits = model(rows.input_ids, rows.position_ids, rows.doc_ids, logits_at=mask).logits
        offline = losses.topk_kl(logits, top.indices.int(), top.values)
        offline = losses.span_normalized(offline, rows.label_spans[mask], counts, objective.span_weights)
    # topk_kl sums 201,087 float32 products per token after a float32 log-sum-exp (kd_online keeps its log-sum-exps
    # in float64): its rounding is ~sqrt(V) * 6e-8 ~ 3e-5 relative, hence 1e-4
    assert out.terms["kl"].item() == pytest.approx(offline.item(), rel=1e-4)


def test_activation_checkpointing_changes_nothing(tmp_path, dataset, hf_teacher):
    """Block outputs are captured in the forward only: recomputed blocks in backward store nothing, and the hidden
    term's gradient flows through the checkpointed blocks (the same kernels: bitwise equal)."""
    steps = {}
    for recompute in (False, True):
        trainer = Trainer.from_config(config(tmp_path, dataset, hf_teacher, f"ac_{recompute}",
                                             train__activation_checkpointing=recompute), Ranks())
        steps[recompute] = [trainer.step() for _ in range(2)]
    assert steps[False] == steps[True] and steps[True][-1].terms["hidden"] > 0


def final_state(run_dir, tmp_path):
    out = tmp_path / f"state_{Path(run_dir).name}.pt"
    dcp_to_torch_save(str(checkpoints.latest(run_dir)), str(out))
    state = torch.load(out, weights_only=False)
    return {f"{part}.{k}": v for part in ("model", "extra") for k, v in state[part].items()}


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_is_bitwise_identical_projections_included(tmp_path, dataset, hf_teacher):
    steps = 4
    sets = dict(train__steps=steps, checkpoint__every=2, distill__standardize=True)
    # both runs in processes of the same settings: the thread count (and buffer alignment) picks CPU kernels
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("straight", "killed"):
        (tmp_path / f"{name}.toml").write_text(config_io.dumps_toml(config(tmp_path, dataset, hf_teacher, name,
                                                                           **sets)))
    straight = subprocess.run([sys.executable, "-m", "vpmoe.cli", "train", str(tmp_path / "straight.toml")],
                              capture_output=True, text=True, cwd=tmp_path, env=env)
    assert straight.returncode == 0, straight.stderr[-2000:]
    cmd = [sys.executable, "-m", "vpmoe.cli", "train", str(tmp_path / "killed.toml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    deadline = time.time() + 300
    while (checkpoints.latest(tmp_path / "killed") or Path("step_0")).name < "step_0000002":
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoints.latest(tmp_path / "killed").name != f"step_{steps:07d}"
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    a, b = final_state(tmp_path / "straight", tmp_path), final_state(tmp_path / "killed", tmp_path)
    assert a.keys() == b.keys() and any(k.startswith("extra.hidden_projections.proj.") for k in a)
    assert any(k.endswith("stat_sumsq") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    curve = lambda run: [(m["step"], m["loss"], m["projection_norms"]) for m in metrics(tmp_path / run)]  # noqa: E731
    assert curve("straight") == curve("killed")
    exported = export(tmp_path / "straight", tmp_path / "exported")  # the student alone: no projections
    names = {name for f in exported.glob("*.safetensors") for name in safe_open(str(f), "pt").keys()}
    assert names == {k.removeprefix("model.") for k in a if k.startswith("model.")}


def test_two_ranks_with_a_sharded_teacher_follow_the_single_process_curve(tmp_path, dataset, hf_teacher):
    """torchrun, 2 CPU processes (gloo; student and teacher FSDP2), micro-batch 1 each == 1 process, 2 micro-batches."""
    two_ranks_follow_the_single_process_curve(tmp_path, dataset, hf_teacher, steps=3)


def test_two_ranks_with_expert_parallelism_follow_the_single_process_curve(tmp_path, dataset, hf_teacher):
    """parallel.ep = 2: each rank holds half of every expert bank of the student (tokens go to their expert's rank)."""
    two_ranks_follow_the_single_process_curve(tmp_path, dataset, hf_teacher, steps=2, parallel__ep=2)


def two_ranks_follow_the_single_process_curve(tmp_path, dataset, hf_teacher, steps, **double_sets):
    common = dict(train__steps=steps, checkpoint__every=steps, data__micro_batch_size=1, distill__standardize=True)
    single = config(tmp_path, dataset, hf_teacher, "single", data__grad_accum=2, **common)
    double = config(tmp_path, dataset, hf_teacher, "double", data__grad_accum=1, teacher__placement="fsdp", **common,
                    **double_sets)
    for cfg, name in ((single, "single"), (double, "double")):
        (tmp_path / f"{name}.toml").write_text(config_io.dumps_toml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "vpmoe.cli", "train", str(tmp_path / "single.toml")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vpmoe.cli", "train", str(tmp_path / "double.toml")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"x ep {double_sets.get('parallel__ep', 1)};" in two.stdout  # the layout asked for
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "double")
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        # float32 sums in another order: the curves agree to 1e-4 relative
        for term in ("ce", "kl", "hidden"):
            assert x["terms"][term] == pytest.approx(y["terms"][term], rel=1e-4), term
        assert x["spans"]["final"]["tokens"] == y["spans"]["final"]["tokens"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
        for pair, norm in x["projection_norms"].items():
            assert norm == pytest.approx(y["projection_norms"][pair], rel=1e-4)


def cli_train(tmp_path, cfg_text):
    path = tmp_path / "bad.toml"
    path.write_text(cfg_text)
    return subprocess.run([sys.executable, "-m", "vpmoe.cli", "train", str(path)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_refusals_exit_2_with_one_line(tmp_path, dataset, hf_teacher):
    base = config_io.dumps_toml(config(tmp_path, dataset, hf_teacher))
    without_teacher = base.split("\n[teacher]")[0] + "\n[distill]" + base.split("\n[distill]")[1]
    other_vocab = tmp_path / "other_vocab"
    other_vocab.mkdir()
    (other_vocab / "config.json").write_text(json.dumps(
        {**json.loads((hf_teacher / "config.json").read_text()), "vocab_size": 128256}))
    cases = {
        "runs a teacher in the loop": without_teacher,
        "vocabulary has 128256 ids": base.replace(json.dumps(str(hf_teacher)), json.dumps(str(other_vocab))),
        "student layer 8 is out of range": base.replace('layer_pairs = "auto"', "layer_pairs = [[8, 1]]"),
        "distill.hidden_final goes with": base.replace('hidden_weight_schedule = "linear"',
                                                       'hidden_weight_schedule = "constant"'),
        "unknown key 'distill.kl_weight'": base.replace("[distill]\n", "[distill]\nkl_weight = 1.0\n"),
    }
    for message, text in cases.items():
        assert text != base or message == "runs a teacher in the loop", message
        done = cli_train(tmp_path, text)
        assert done.returncode == 2, (message, done.stderr[-2000:])
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kd_online_trains_on_a_gpu_with_the_fast_kernels_in_bf16(tmp_path, dataset, hf_teacher):
    run = train(config(tmp_path, dataset, hf_teacher, train__device="cuda", train__precision="bf16",
                       train__kernels="fast", teacher__dtype="bfloat16", train__steps=20, checkpoint__every=20,
                       train__log_every=5))
    log = metrics(run)
    assert all(torch.isfinite(torch.tensor(list(m["terms"].values()))).all() for m in log)
    assert log[-1]["terms"]["kl"] < 0.8 * log[0]["terms"]["kl"]
    assert log[-1]["teacher"]["forward_ms"] > 0 and log[-1]["kl_chunks"] >= 1
