"""On-policy distillation (stage opd): prompts data, rollout spans and alignment, the curriculum, the loss against
TRL's generalized JSD (beta = 1) and float64 math, teacher = student, resume after SIGKILL, 2 ranks = 1 process.

The sampler's own guarantees (temperature 0 = greedy `generate`, log-probs = a full forward's in float64, stop
tokens end a row) are tested in test_model_sample.py; here: nothing after a stop token is trained on."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from vpmoe import config as config_io
from vpmoe import spans
from vpmoe import tokenizer as tk
from vpmoe.artifacts import checkpoints
from vpmoe.artifacts.models import save_model
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.data.harmony import HarmonyRenderer, harmony_conversation, system_tokens
from vpmoe.data.loader import SplitReader
from vpmoe.distributed import Ranks
from vpmoe.errors import RunError, UserError
from vpmoe.model import build_model, load_model_config
from vpmoe.train import rollouts
from vpmoe.train.config import load_train_config
from vpmoe.train.opd_config import OpdSection
from vpmoe.train.curriculum import EFFORTS, Curriculum, CurriculumSection
from vpmoe.train.trainer import train


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_prompts")
    src = synthetic.write_jsonl(root / "src.jsonl", synthetic.records(12, seed=11))
    return build(DataSection(inputs=[str(src)], format="prompts", out=str(root / "ds"), seq_len=256,
                             valid_fraction=0.25))


@pytest.fixture(scope="module")
def student_init(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(build_model(load_model_config("tiny_moe")), tmp_path_factory.mktemp("opd_init") / "init")


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """Another initialization of the same shape: a teacher the student is far from."""
    torch.manual_seed(1)
    return save_model(build_model(load_model_config("tiny_moe")), tmp_path_factory.mktemp("opd_teacher") / "teacher")


def opd_config(tmp_path, dataset, teacher, name="run", student=None, **sets):
    changes = {"run.dir": tmp_path / name, "data.path": dataset, "teacher.path": teacher,
               "model.init_from": student or teacher,
               "train.log_every": 1, "opd.rollouts_every": 1, "opd.max_new_tokens": 12, "optim.warmup_steps": 1,
               "curriculum.max_new_tokens": [8, 12], **{k.replace("__", "."): v for k, v in sets.items()}}
    return config_io.replace(load_train_config("tiny_opd"), changes)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ---- prompts ---------------------------------------------------------------------------------------------------------

def test_prompts_equal_harmony_completion_prompts(prompts):
    """system(effort) + a stored prompt = openai-harmony's rendering of (system, user) for an assistant completion."""
    from openai_harmony import Conversation, Message, ReasoningEffort, Role, SystemContent

    manifest = json.loads((prompts / "manifest.json").read_text())
    assert manifest["format"] == "prompts" and manifest["reasoning_effort"] is None
    assert manifest["provenance"]["kind"] == "dataset" and manifest["records"]["rejected"] == 0
    records = {r["query"]: r for r in synthetic.records(12, seed=11)}
    reader = SplitReader(prompts, "train")
    for i in range(len(reader)):
        tokens, labels = reader.sample(i)
        assert not labels.any()
        text = tk.decode(tokens.tolist())
        query = text.split("<|message|>", 1)[1].split("<|end|>", 1)[0]
        assert query in records
        for effort in EFFORTS:
            system = Message.from_role_and_content(
                Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize())))
            conversation = Conversation.from_messages([system, Message.from_role_and_content(Role.USER, query)])
            expected = tk.harmony().render_conversation_for_completion(conversation, Role.ASSISTANT)
            assert system_tokens(effort) + tokens.tolist() == list(expected)


def test_prompts_format_refuses_packing(tmp_path):
    src = synthetic.write_jsonl(tmp_path / "src.jsonl", synthetic.records(2, seed=1))
    with pytest.raises(UserError, match="pack"):
        config_io.replace(DataSection([str(src)], "prompts", str(tmp_path / "ds")), {"pack": True})


# ---- spans, rows, alignment ------------------------------------------------------------------------------------------

def test_completion_spans_follow_the_dataset_renderer():
    """The spans of a sampled completion equal the labels the data build gives the same tokens."""
    renderer = HarmonyRenderer("medium")
    rendered = renderer.render("What is 2 + 3?", "Add them: 5.", "The answer is 5.", seq_len=512)
    tokens = rendered.tokens.tolist()
    from openai_harmony import RenderConversationConfig

    reference = list(tk.harmony().render_conversation_for_training(
        harmony_conversation("What is 2 + 3?", "Add them: 5.", "The answer is 5.", "medium"),
        RenderConversationConfig(auto_drop_analysis=False)))
    assert tokens == reference
    prompt_len = len(renderer.system) + len(renderer.user_head) + len(tk.encode("What is 2 + 3?")) + 1 + 2
    assert tokens[prompt_len - 2:prompt_len] == renderer.assistant_head
    completion = tokens[prompt_len:]
    expected = rendered.spans[prompt_len:]
    expected = np.where(expected == 0, spans.REASONING, expected)  # the analysis header's tokens before it
    np.testing.assert_array_equal(rollouts.completion_spans(completion), expected)
    assert rollouts.completion_spans(completion)[-1] == spans.FINAL  # <|return|> closes the final message
    # a header cut off before its channel is known is reasoning
    assert (rollouts.completion_spans([tk.CHANNEL, *tk.encode("fin")]) == spans.REASONING).all()


def test_rows_train_nothing_after_a_stop_token():
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[11, 12, tk.RETURN], [13]]
    batch, select = rollouts.training_rows(prompts, completions)
    assert select.sum() == 4 and batch.label_spans.count_nonzero() == 4
    # positions predicting after each row's last completion token carry no loss
    for row, (p, c) in enumerate(zip(prompts, completions)):
        assert select[row].nonzero().squeeze(1).tolist() == list(range(len(p) - 1, len(p) + len(c) - 1))
        assert batch.labels[row][select[row]].tolist() == c
    rollouts.check_alignment(batch.input_ids, select, completions, "student")


def test_asymmetric_alignment_holds_and_a_shifted_one_is_refused():
    completions = [[11, 12, tk.RETURN], [13, 14]]
    student = [system_tokens("medium") + [1, 2], system_tokens("medium") + [3]]
    teacher = [system_tokens("high") + [1, 2], system_tokens("high") + [3]]
    assert len(teacher[0]) != len(student[0]) or teacher[0] != student[0]
    for prompt_set in (student, teacher):
        batch, select = rollouts.training_rows(prompt_set, completions)
        rollouts.check_alignment(batch.input_ids, select, completions, "teacher")
    shifted = torch.roll(select, 1, dims=1)
    with pytest.raises(RunError, match="misaligned"):
        rollouts.check_alignment(batch.input_ids, shifted, completions, "teacher")
    with pytest.raises(RunError, match="misaligned"):
        rollouts.check_alignment(batch.input_ids, select, [[11, 12, tk.END], [13, 14]], "teacher")


# ---- curriculum ------------------------------------------------------------------------------------------------------

def test_curriculum_shares_and_lengths_per_step_and_resume():
    section = CurriculumSection(steps=[0, 4, 12], low=[0.0, 0.0, 0.2], medium=[1.0, 1.0, 0.2],
                                high=[0.0, 0.0, 0.6], max_new_tokens=[100, 100, 300])
    schedule = Curriculum(section, max_new_tokens=300, seed=3)
    n = 10
    drawn = [schedule.next(n) for _ in range(16)]
    for step, phase, efforts in drawn:
        t = min(max((step - 4) / 8, 0.0), 1.0)  # the ramp between the 2nd and 3rd control points
        expected = {"low": 0.2 * t, "medium": 1.0 - 0.8 * t, "high": 0.6 * t}
        assert phase.shares == pytest.approx(expected, abs=1e-12)
        assert phase.max_new_tokens == int(100 + 200 * t)
        counts = {e: efforts.count(e) for e in EFFORTS}
        assert sum(counts.values()) == n
        assert all(abs(counts[e] - expected[e] * n) < 1 for e in EFFORTS)
    assert [e for e in drawn[-1][2]].count("high") == 6
    resumed = Curriculum(section, max_new_tokens=300, seed=3)
    halfway = Curriculum(section, max_new_tokens=300, seed=3)
    for _ in range(7):
        halfway.next(n)
    resumed.load_state_dict(halfway.state_dict())
    assert [resumed.next(n)[2] for _ in range(9)] == [d[2] for d in drawn[7:]]
    with pytest.raises(ValueError, match="capacity"):
        Curriculum(section, max_new_tokens=200, seed=0)
    with pytest.raises(UserError, match="sum to 1"):
        config_io.replace(CurriculumSection(), {"medium": [0.5]})


# ---- the loss --------------------------------------------------------------------------------------------------------

class FixedTeacher:
    """A teacher head and hidden states chosen by the test."""

    name, placement = "fixed", "cpu"

    def __init__(self, weight, bias):
        self.head_weight, self.head_bias = weight, bias


def test_reverse_kl_loss_and_gradient_equal_trl_and_float64(tmp_path, prompts, student_init):
    """The OPD loss of one micro-batch (exact reverse KL, span-normalized by global counts) and its gradient equal
    TRL's generalized_jsd_loss at beta = 1 per span on the same logits, and float64 math; so does the sampled-token
    estimator's against float64 math."""
    from trl.experimental.gkd import GKDTrainer

    from vpmoe.train.objectives.opd import OnPolicyDistillation, RolloutBatch

    torch.manual_seed(1)
    cfg = opd_config(tmp_path, prompts, student_init, opd__chunk_tokens=5)
    model = build_model(load_model_config("tiny_moe"))
    vocab, d_teacher = model.head.weight.shape[0], 24
    teacher = FixedTeacher(torch.randn(vocab, d_teacher) * 0.2, torch.randn(vocab) * 0.5)
    objective = OnPolicyDistillation(cfg, Ranks(0, 1, 0, torch.device("cpu")), teacher=teacher)
    completions = [[tk.CHANNEL, *tk.encode("analysis"), tk.MESSAGE, 5, 6, tk.END, tk.START, *tk.encode("assistant"),
                    tk.CHANNEL, *tk.encode("final"), tk.MESSAGE, 7, tk.RETURN], [tk.CHANNEL, 9, 10]]
    batch, select = rollouts.training_rows([[1, 2, 3], [4, 5]], completions)
    n = int(select.sum())
    rollout = RolloutBatch(rows=batch, select=select, teacher_hidden=torch.randn(n, d_teacher),
                           sampler_logprobs=-torch.rand(n), efforts=torch.ones(n, dtype=torch.long),
                           prompts=[[1, 2, 3], [4, 5]], completions=completions, row_efforts=["medium"] * 2)
    label_spans = batch.label_spans[select]
    counts = torch.bincount(label_spans, minlength=spans.COUNT) * torch.tensor([1, 3, 2])  # other micro-batches
    out = objective.loss(model, rollout, counts)
    params = [model.head.weight, model.final_norm.weight, model.layers[0].attn.q_a.weight]
    ours = torch.autograd.grad(out.terms["reverse_kl"], params)

    logits = model(batch.input_ids, batch.position_ids, batch.doc_ids, logits_at=select).logits
    teacher_logits = rollout.teacher_hidden @ teacher.head_weight.T + teacher.head_bias
    reference = 0
    for span in (spans.REASONING, spans.FINAL):
        labels = torch.where(label_spans == span, 0, -100)[None]
        reference = reference + GKDTrainer.generalized_jsd_loss(
            logits[None], teacher_logits[None], labels=labels, beta=1.0, reduction="sum") / counts[span]
    theirs = torch.autograd.grad(reference, params)
    assert out.terms["reverse_kl"].item() == pytest.approx(reference.item(), rel=1e-5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    # float64: sum_v p_S (log p_S - log p_T) per token, span means over the global counts
    log_s, log_t = logits.double().log_softmax(-1), teacher_logits.double().log_softmax(-1)
    per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    exact = sum(per_token[label_spans == s].sum() / counts[s] for s in (spans.REASONING, spans.FINAL))
    assert out.terms["reverse_kl"].item() == pytest.approx(exact.item(), rel=1e-6)

    # opd.loss = "sampled" on the same rollouts: -min(r A, clip(r) A) with A = log p_T - log p_sampler and
    # r = exp(log p_S - log p_sampler) of the sampled ids, in float64 from the full logits
    objective.opd = config_io.replace(cfg, {"opd.loss": "sampled", "opd.clip_low": 0.1, "opd.clip_high": 0.2}).opd
    out = objective.loss(model, rollout, counts)
    ours = torch.autograd.grad(out.terms["sampled_reverse_kl"], params)
    ids = batch.labels[select]
    logits = model(batch.input_ids, batch.position_ids, batch.doc_ids, logits_at=select).logits
    logp = logits.double().log_softmax(-1).gather(1, ids[:, None])[:, 0]
    advantage = log_t.gather(1, ids[:, None])[:, 0] - rollout.sampler_logprobs.double()
    ratio = (logp - rollout.sampler_logprobs.double()).exp()
    per_token = -torch.minimum(ratio * advantage, ratio.clamp(0.9, 1.2) * advantage)
    reference = sum(per_token[label_spans == s].sum() / counts[s] for s in (spans.REASONING, spans.FINAL))
    theirs = torch.autograd.grad(reference, params)
    assert out.terms["sampled_reverse_kl"].item() == pytest.approx(reference.item(), rel=1e-5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-7)


# ---- the stage end to end --------------------------------------------------------------------------------------------

def test_teacher_equal_to_the_student_gives_zero_kl(tmp_path, prompts, student_init):
    for loss in ("exact", "sampled"):
        run = train(opd_config(tmp_path, prompts, student_init, name=loss, opd__loss=loss, train__steps=1,
                               checkpoint__every=1))
        first = metrics(run)[0]
        assert abs(first["opd"]["reverse_kl"]) <= 1e-6
        assert abs(first["opd"]["sampled_kl"]) <= 1e-4  # the sampler's decode path vs the teacher's forward
        term = "reverse_kl" if loss == "exact" else "sampled_reverse_kl"
        assert abs(first["terms"][term]) <= 1e-4
        tokens = sum(first["spans"][s]["tokens"] for s in ("reasoning", "final"))
        assert tokens == round(first["opd"]["length"]["mean"] * 2 * 2)  # every sampled token, nothing after
        for key in ("truncated_fraction", "return_rate", "parse_failure_rate", "repetition_rate",
                    "sampled_tokens_per_s", "rollouts_per_s", "by_effort", "length"):
            assert key in first["opd"]
        assert "router" in first and "entropy" in first["spans"]["reasoning"]
        dumped = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
        assert dumped and len(dumped[0]["reverse_kl"]) == len(dumped[0]["completion_ids"])


def test_opd_refuses_a_dataset_that_is_not_prompts(tmp_path, student_init):
    src = synthetic.write_jsonl(tmp_path / "src.jsonl", synthetic.records(4, seed=1))
    synth = build(DataSection([str(src)], "synth", str(tmp_path / "ds"), seq_len=256, valid_fraction=0.0))
    with pytest.raises(UserError, match="prompts"):
        train(opd_config(tmp_path, synth, student_init, train__steps=1, checkpoint__every=1))


def final_weights(run_dir, tmp_path):
    out = tmp_path / f"weights_{Path(run_dir).name}.pt"
    dcp_to_torch_save(str(checkpoints.latest(run_dir)), str(out))
    return torch.load(out, weights_only=False)["model"]


def test_resume_after_sigkill_reproduces_rollouts_and_weights(tmp_path, prompts, student_init, other_teacher):
    steps = 4
    common = dict(train__steps=steps, checkpoint__every=1, curriculum__steps=[0, 2], student=student_init)
    train(opd_config(tmp_path, prompts, other_teacher, "straight", **common))
    cfg_file = tmp_path / "killed.toml"
    cfg_file.write_text(config_io.dumps_toml(opd_config(tmp_path, prompts, other_teacher, "killed", **common)))
    cmd = [sys.executable, "-m", "vpmoe.cli", "train", str(cfg_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 300
    latest = lambda: checkpoints.latest(tmp_path / "killed")  # noqa: E731
    while latest() is None or latest().name < "step_0000002":
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoints.latest(tmp_path / "killed").name != f"step_{steps:07d}"
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    a, b = final_weights(tmp_path / "straight", tmp_path), final_weights(tmp_path / "killed", tmp_path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    dump = lambda run: (tmp_path / run / "rollouts.jsonl").read_text()  # noqa: E731
    assert dump("straight") == dump("killed")
    losses = lambda run: [(m["step"], m["loss"], m["opd"]["by_effort"]) for m in metrics(tmp_path / run)]  # noqa: E731
    assert losses("straight") == losses("killed")


def test_two_ranks_equal_one_process(tmp_path, prompts, student_init, other_teacher):
    """torchrun, 2 CPU processes (gloo, FSDP2 student, the teacher sharded forward-only over both): the same
    rollouts and losses as one process with 2 micro-batches."""
    two_ranks_equal_one_process(tmp_path, prompts, student_init, other_teacher)


def test_two_ranks_with_expert_parallelism_equal_one_process(tmp_path, prompts, student_init, other_teacher):
    """parallel.ep = 2: each rank holds half of every expert bank; the sampling copy gathers whole banks."""
    two_ranks_equal_one_process(tmp_path, prompts, student_init, other_teacher, parallel__ep=2)


def two_ranks_equal_one_process(tmp_path, prompts, student_init, other_teacher, **double_sets):
    common = dict(train__steps=2, checkpoint__every=2, data__micro_batch_size=1, opd__samples_per_prompt=2,
                  student=student_init)
    single = opd_config(tmp_path, prompts, other_teacher, "single", data__grad_accum=2, **common)
    double = opd_config(tmp_path, prompts, other_teacher, "double", data__grad_accum=1, teacher__placement="fsdp",
                        **common, **double_sets)
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
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    assert a[0]["opd"]["reverse_kl"] > 0.01  # another initialization (1e-6 at teacher = student): real gradients
    for x, y in zip(a, b):
        assert x["opd"]["length"] == y["opd"]["length"] and x["opd"]["by_effort"].keys() == y["opd"]["by_effort"].keys()
        for span in ("reasoning", "final"):
            assert x["spans"][span]["tokens"] == y["spans"][span]["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-7)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3, abs=1e-7)
    dump = lambda run: [json.loads(line)["completion_ids"] for line in  # noqa: E731
                        (tmp_path / run / "rollouts.jsonl").read_text().splitlines()]
    assert dump("single") == dump("double")


def test_heldout_reverse_kl_is_zero_against_itself_and_positive_against_another(prompts, student_init, other_teacher):
    from vpmoe.artifacts.models import load_model
    from vpmoe.eval.opd_kl import heldout_reverse_kl
    from vpmoe.teacher.online import OnlineTeacherSection, load_online_teacher

    model = load_model(student_init)
    results = []
    for teacher in (student_init, other_teacher):
        online = load_online_teacher(OnlineTeacherSection(path=str(teacher), dtype="float32"), Ranks())
        results.append(heldout_reverse_kl(model, online, prompts, max_prompts=2, max_new_tokens=6))
    same, other = results
    assert same["all"]["tokens"] == other["all"]["tokens"] == 2 * 2 * 6  # the same seed: the same samples
    assert abs(same["all"]["reverse_kl"]) <= 1e-6 and other["all"]["reverse_kl"] > 0.01


def test_shipped_prompts_build_config_loads():
    from vpmoe.data.build import BuildConfig

    cfg = config_io.load("prompts", BuildConfig, kind="data")
    assert cfg.data.format == "prompts" and not cfg.data.pack


def test_training_in_row_chunks_equals_the_whole_micro_batch(tmp_path, prompts, student_init, other_teacher):
    """opd.train_rows splits a sampled micro-batch for the teacher and the training: same rollouts, same loss and
    gradient (fp32 sums in another order)."""
    runs = [metrics(train(opd_config(tmp_path, prompts, other_teacher, f"rows{rows}", student=student_init,
                                     opd__train_rows=rows, train__steps=1, checkpoint__every=1)))[0]
            for rows in (0, 1)]
    whole, chunked = runs
    assert whole["opd"]["length"] == chunked["opd"]["length"]
    assert whole["terms"]["reverse_kl"] == pytest.approx(chunked["terms"]["reverse_kl"], rel=1e-5)
    for span in ("reasoning", "final"):
        assert whole["spans"][span]["tokens"] == chunked["spans"][span]["tokens"]
    # the MoE aux loss is a mean over the forwards (its routing statistics are per forward): of the same size
    assert whole["terms"]["aux"] == pytest.approx(chunked["terms"]["aux"], rel=0.5)


def test_asymmetric_prompts_train_with_the_teacher_on_its_own_effort(tmp_path, prompts, student_init):
    """The student's prompts stay on low effort while the teacher's follow the curriculum (medium, then high): the
    teacher scores the completions after its own, longer system message, and the alignment holds."""
    run = train(opd_config(tmp_path, prompts, student_init, opd__student_effort="low", train__steps=2,
                           checkpoint__every=2, curriculum__steps=[0, 1], curriculum__medium=[1.0, 0.0],
                           curriculum__high=[0.0, 1.0]))
    log = metrics(run)
    assert set(log[0]["opd"]["by_effort"]) == {"medium"} and set(log[1]["opd"]["by_effort"]) == {"high"}
    dumped = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert all("Reasoning: low" in record["prompt"] for record in dumped)
    # the teacher (the student's own weights) sees another system message: the KL is no longer 0
    assert log[0]["opd"]["reverse_kl"] > 1e-6


def test_config_refusals(tmp_path, prompts, student_init):
    with pytest.raises(UserError, match="capacity"):
        opd_config(tmp_path, prompts, student_init, opd__max_new_tokens=10)  # the curriculum reaches 12
    with pytest.raises(UserError, match="teacher"):
        config_io.replace(load_train_config("tiny_opd"), {"teacher": None})
    with pytest.raises(UserError, match="opd.samples_per_prompt"):
        opd_config(tmp_path, prompts, student_init, opd__samples_per_prompt=0)
    with pytest.raises(UserError, match="loss.ce does not apply"):  # not silently ignored
        opd_config(tmp_path, prompts, student_init, loss__ce=0.5)
    ce_stage = {"train.stage": "ce", "teacher": None}
    with pytest.raises(UserError, match=r"\[opd\] is for"):
        config_io.replace(load_train_config("tiny_opd"), ce_stage)
    with pytest.raises(UserError, match=r"\[curriculum\] is for"):
        config_io.replace(load_train_config("tiny_opd"), {**ce_stage, "opd": None})
    plain = config_io.replace(load_train_config("tiny_opd"), {"opd": None, "curriculum": None})
    assert plain.opd_section == OpdSection() and plain.curriculum_section == CurriculumSection()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: bf16, fast kernels, graph-captured sampler")
@pytest.mark.parametrize("sampler", ["graph", "compile"])
def test_gpu_step_with_a_captured_sampler(tmp_path, prompts, student_init, sampler):
    """On CUDA (bf16 autocast over fp32 master weights, a bf16 sampling copy): teacher = student gives a reverse KL
    of bf16 rounding size, and the sampled estimate stays near it."""
    run = train(opd_config(tmp_path, prompts, student_init, train__steps=2, checkpoint__every=2,
                           train__device="cuda", train__precision="bf16", train__kernels="fast",
                           teacher__dtype="bfloat16", opd__sampler=sampler))
    first = metrics(run)[0]["opd"]
    assert abs(first["reverse_kl"]) < 1e-2 and abs(first["sampled_kl"]) < 5e-2
    assert first["sampled_tokens_per_s"] > 0


def test_rollout_statistics_against_plain_python():
    rng = np.random.default_rng(0)
    completions = [rng.integers(0, 5, size=n).tolist() for n in (0, 3, 9, 40)] + [[7, 8, 7, 8, 7, 8, 7]]
    for n in (1, 2, 4):
        grams = [[tuple(c[i:i + n]) for i in range(len(c) - n + 1)] for c in completions]
        expected = sum(len(g) - len(set(g)) for g in grams) / sum(len(g) for g in grams)
        assert rollouts.repetition_rate(completions, n) == pytest.approx(expected, rel=1e-12)
    good = [tk.CHANNEL, *tk.encode("final"), tk.MESSAGE, *tk.encode("5"), tk.RETURN]
    assert rollouts.parse_failures([good, [*tk.encode("no header"), tk.RETURN], good]) == 1
    # completions without <|message|> are counted without the parser: the parser refuses them as well
    from openai_harmony import HarmonyError, Role

    headless = [[tk.CHANNEL, *tk.encode("final")], rng.integers(0, 199_000, size=30).tolist(), [tk.RETURN], []]
    for tokens in headless:
        with pytest.raises(HarmonyError):
            tk.harmony().parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    assert rollouts.parse_failures(headless) == len(headless)


def test_a_resumed_run_drops_later_and_torn_rollout_lines(tmp_path):
    from vpmoe.train.objectives.opd import _truncate_rollouts

    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "compl')
    _truncate_rollouts(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
