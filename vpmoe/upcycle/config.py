"""The config of one `vpmoe upcycle` run: which conversion, from which object to which, and its knobs.

    [upcycle]
    step = "granular"              # transplant | surgery | morph | expand | granular
    source = "vpDense"             # registry name of the input object
    target = "vpMoE"               # registry name of the output object (its registry entry names the step)
    input = "weights/upcycle/vpDense"
    output = "weights/upcycle/vpMoE"
    registry = "configs/upcycle/objects.toml"
    seed = 0

Relative paths are taken from the working directory. Sections other than [upcycle] and [calibration] are read
only by their step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vpmoe import config as config_io

STEPS = ("transplant", "surgery", "morph", "expand", "granular")
STREAMED_STEPS = ("surgery", "morph", "expand", "granular")
# Parameter groups the block-wise morph may train (vpmoe.upcycle.blockfit.trainable_names says what each holds).
FIT_GROUPS = ("tpa", "bias", "sink", "value_residual", "frequency", "global_qk")


@dataclass
class UpcycleSection:
    step: Literal["transplant", "surgery", "morph", "expand", "granular"]
    source: str
    target: str
    input: str
    output: str
    registry: str = "configs/upcycle/objects.toml"
    seed: int = 0
    overwrite: bool = False  # replace an existing output directory (only one written by `vpmoe upcycle`)
    # Steps surgery (mean or fit), morph (mapped or block-wise), expand and granular (router fit included) read,
    # convert (and fit) and write one layer at a time and measure drift block by block: never two full models in
    # memory (vpmoe.upcycle.stream). Their weights are then written in `dtype`; the in-memory path writes fp32.
    stream: bool = False
    dtype: Literal["fp32", "bf16"] = "fp32"


@dataclass
class CalibrationSection:
    """The fixed calibration batch of the drift report: SYNTH-schema records rendered as Harmony conversations."""

    records: int = 8
    seed: int = 1234
    seq_len: int = 512
    reasoning_effort: str = "medium"

    def validate(self) -> None:
        if self.records <= 0 or self.seq_len <= 16:
            raise ValueError("calibration.records must be positive and calibration.seq_len above 16")


@dataclass
class TransplantSection:
    """Step 1: mergekit-tokensurgeon with a donor that already has the target vocabulary."""

    donor: str = ""  # local HF directory of the vocabulary donor (gpt-oss-20b for the real run)
    donor_object: str = ""  # its registry name; when set, the donor directory is checked like an input
    method: str = "omp"
    k: int = 64
    batch_size: int = 512
    device: str = "cpu"  # mergekit's --device ("cuda" makes the OMP of ~50k new rows at k = 64 fast)
    pad_to_vocab: bool = True  # pad rows up to the registry's vocab (ids that the tokenizer never emits) with 0

    def validate(self) -> None:
        if self.k <= 0 or self.batch_size <= 0:
            raise ValueError("transplant.k and transplant.batch_size must be positive")


@dataclass
class SurgerySection:
    """Step 2: head pooling + FFN method A. `method` = "mean" (the baseline) or "fit" (activation-aware)."""

    method: Literal["mean", "fit"] = "mean"
    fit_records: int = 64  # calibration records for the fit (a different seed than the drift batch)
    fit_seed: int = 99
    ridge: float = 1e-3  # relative ridge of the least-squares fits (times the mean diagonal of the Gram matrix)

    def validate(self) -> None:
        if self.fit_records <= 0 or self.ridge < 0:
            raise ValueError("surgery.fit_records must be positive and surgery.ridge non-negative")


@dataclass
class FitDataSection:
    """The calibration data of the fits (step 3's block-wise morph, step 5's router fit): the first samples of the
    train split of a dataset built by `vpmoe data build`."""

    dataset: str = ""  # "" = no fit data
    fit_samples: int = 32  # samples the fits are fitted on
    heldout_samples: int = 8  # the next samples: errors before and after are measured on them
    max_tokens: int = 512  # each sample is cut to its first max_tokens tokens

    def validate(self) -> None:
        if min(self.fit_samples, self.heldout_samples) < 1 or self.max_tokens < 2:
            raise ValueError("fit_data.fit_samples and heldout_samples must be at least 1, max_tokens at least 2")


@dataclass
class MorphSection:
    """Step 3: compat -> real. method "mapped": the weight mapping alone; "blockwise": then every real block is
    fitted to its compat block on calibration activations (vpmoe.upcycle.blockfit, data from [fit_data]); "auto":
    blockwise when fit_data.dataset names a dataset, else mapped.

    `workers` > 1 fits blocks 1.. in that many CPU processes at once (blocks are independent given the compat
    activations; layer 0 is fitted first, its V feeds the others), each with an equal share of the torch threads;
    memory grows to `workers` real blocks and sets of calibration activations. The fit of each block is the same
    arithmetic as with workers = 1 (floating-point sums may differ in the last bits across processes). CPU only."""

    sink_init: float = -10.0
    value_residual_init: float = -10.0
    method: Literal["auto", "mapped", "blockwise"] = "auto"
    steps: int = 200  # Adam steps per block (the budget)
    lr: float = 1e-3
    rows_per_step: int = 4
    q_init: Literal["whitened", "svd"] = "whitened"  # TPA Q of local layers: activation-aware SVD or the mapping's
    device: Literal["cpu", "cuda"] = "cpu"  # where the block-wise fit runs (both 28-layer models fit on one GPU)
    trainable: list[str] = field(default_factory=lambda: list(FIT_GROUPS))
    workers: int = 1  # processes fitting blocks at once (CPU only: 1 with device "cuda")

    def validate(self) -> None:
        if self.workers < 1:
            raise ValueError("morph.workers must be at least 1")
        if self.workers > 1 and self.device == "cuda":
            raise ValueError(f"morph.workers = {self.workers} fits blocks in CPU processes, morph.device is "
                             "\"cuda\": set morph.workers = 1 on CUDA")
        if self.rows_per_step < 1:
            raise ValueError("morph.rows_per_step must be at least 1")
        if self.steps < 0 or self.lr <= 0:
            raise ValueError("morph.steps must be >= 0 and morph.lr positive")
        unknown = [g for g in self.trainable if g not in FIT_GROUPS]
        if unknown:
            raise ValueError(f"morph.trainable: unknown group {unknown[0]!r}; groups are {list(FIT_GROUPS)}")


@dataclass
class GranularSection:
    """Step 5: dense -> MoE."""

    router_std: float = 0.02  # std of the random router rows (one per virtual group, then replicated)
    noise: float = 0.0  # symmetry-breaking noise on expert weights, relative to each weight tensor's std
    # Fit the router rows on [fit_data] so that each token picks the virtual group whose (noisy) experts best
    # reproduce the dense FFN (vpmoe.upcycle.granular.fit_router); only meaningful with noise > 0.
    fit_router: bool = False
    router_fit_steps: int = 200
    router_fit_lr: float = 1e-2

    def validate(self) -> None:
        if self.router_std <= 0 or self.noise < 0:
            raise ValueError("granular.router_std must be positive and granular.noise non-negative")
        if self.router_fit_steps < 1 or self.router_fit_lr <= 0:
            raise ValueError("granular.router_fit_steps must be at least 1 and router_fit_lr positive")


@dataclass
class HealSection:
    """An optional short healing stage after the conversion (vpmoe.upcycle.heal): `vpmoe train` on the new object."""

    config: str = ""  # a train config, shipped name (heal_real, heal_compat) or path; "" = no healing
    steps: int = 0  # 0: the train config's own train.steps
    run_dir: str = ""  # the healing run's directory; "" = `<output>.heal` beside the output
    overrides: list[str] = field(default_factory=list)  # `section.key=value` overrides of the train config

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError("heal.steps must be >= 0")


@dataclass
class UpcycleConfig:
    upcycle: UpcycleSection
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    fit_data: FitDataSection = field(default_factory=FitDataSection)
    transplant: TransplantSection = field(default_factory=TransplantSection)
    surgery: SurgerySection = field(default_factory=SurgerySection)
    morph: MorphSection = field(default_factory=MorphSection)
    granular: GranularSection = field(default_factory=GranularSection)
    heal: HealSection = field(default_factory=HealSection)

    def validate(self) -> None:
        u = self.upcycle
        if u.stream and u.step not in STREAMED_STEPS:
            raise ValueError(f"upcycle.stream covers steps {list(STREAMED_STEPS)}; step {u.step!r} converts in memory")
        if u.dtype != "fp32" and not u.stream:
            raise ValueError("upcycle.dtype other than fp32 needs upcycle.stream = true")
        if self.heal.config and self.upcycle.step == "transplant":
            raise ValueError("heal: the transplant writes a Hugging Face model, which `vpmoe train` does not train")
        if self.morph.method == "blockwise" and not self.fit_data.dataset:
            raise ValueError("morph.method = \"blockwise\" needs fit_data.dataset (a dataset directory)")
        if self.granular.fit_router and not self.fit_data.dataset:
            raise ValueError("granular.fit_router needs fit_data.dataset (a dataset directory)")

    @property
    def blockwise_morph(self) -> bool:
        return self.morph.method == "blockwise" or (self.morph.method == "auto" and bool(self.fit_data.dataset))


def load_upcycle_config(path: str | Path, overrides: list[str] | None = None) -> UpcycleConfig:
    return config_io.load(path, UpcycleConfig, overrides, kind="upcycle")
