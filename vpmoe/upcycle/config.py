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
class MorphSection:
    """Step 3: compat -> real. method "mapped": the weight mapping alone; "blockwise": then every real block is
    fitted to its compat block on calibration activations (vpmoe.upcycle.blockfit); "auto": blockwise when
    `calibration` names a dataset, else mapped."""

    sink_init: float = -10.0
    value_residual_init: float = -10.0
    method: Literal["auto", "mapped", "blockwise"] = "auto"
    calibration: str = ""  # a dataset built by `vpmoe data build`; its train split's first samples are used
    fit_samples: int = 32  # samples the blocks are fitted on
    heldout_samples: int = 8  # the next samples: the per-block error before and after is measured on them
    max_tokens: int = 512  # each sample is cut to its first max_tokens tokens
    steps: int = 200  # Adam steps per block (the budget)
    lr: float = 1e-3
    rows_per_step: int = 4
    q_init: Literal["whitened", "svd"] = "whitened"  # TPA Q of local layers: activation-aware SVD or the mapping's
    trainable: list[str] = field(default_factory=lambda: list(FIT_GROUPS))

    def validate(self) -> None:
        if self.method == "blockwise" and not self.calibration:
            raise ValueError("morph.method = \"blockwise\" needs morph.calibration (a dataset directory)")
        if min(self.fit_samples, self.heldout_samples, self.rows_per_step) < 1 or self.max_tokens < 2:
            raise ValueError("morph.fit_samples, heldout_samples and rows_per_step must be at least 1, max_tokens 2")
        if self.steps < 0 or self.lr <= 0:
            raise ValueError("morph.steps must be >= 0 and morph.lr positive")
        unknown = [g for g in self.trainable if g not in FIT_GROUPS]
        if unknown:
            raise ValueError(f"morph.trainable: unknown group {unknown[0]!r}; groups are {list(FIT_GROUPS)}")

    @property
    def blockwise(self) -> bool:
        return self.method == "blockwise" or (self.method == "auto" and bool(self.calibration))


@dataclass
class GranularSection:
    """Step 5: dense -> MoE."""

    router_std: float = 0.02  # std of the random router rows (one per virtual group, then replicated)
    noise: float = 0.0  # symmetry-breaking noise on expert weights, relative to each weight tensor's std

    def validate(self) -> None:
        if self.router_std <= 0 or self.noise < 0:
            raise ValueError("granular.router_std must be positive and granular.noise non-negative")


@dataclass
class UpcycleConfig:
    upcycle: UpcycleSection
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    transplant: TransplantSection = field(default_factory=TransplantSection)
    surgery: SurgerySection = field(default_factory=SurgerySection)
    morph: MorphSection = field(default_factory=MorphSection)
    granular: GranularSection = field(default_factory=GranularSection)


def load_upcycle_config(path: str | Path, overrides: list[str] | None = None) -> UpcycleConfig:
    return config_io.load(path, UpcycleConfig, overrides, kind="upcycle")
