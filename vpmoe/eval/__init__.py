"""Core eval: held-out loss / perplexity / bits-per-byte per span, the pinned prompt micro-suite, sanity
invariants; reports beside the checkpoint, comparisons across checkpoints.

    from vpmoe.eval import evaluate_checkpoint, compare
    a = evaluate_checkpoint("runs/ce", dataset="data/ds")      # -> runs/ce/eval/step_NNNNNNN.{json,md}
    b = evaluate_checkpoint("runs/kd", dataset="data/ds")
    compare([a, b], "runs/compare")                             # -> compare.{md,json,png}, table printed

The lm-evaluation-harness adapter is `vpmoe.eval.lm_eval_adapter` (needs the `eval` extra).
"""

from vpmoe.eval.config import EvalConfig, EvalSection, load_eval_config
from vpmoe.eval.heldout import heldout_loss
from vpmoe.eval.run import EvalResult, compare, eval_from_cli, evaluate_checkpoint, run_eval
from vpmoe.eval.sanity import run_sanity
from vpmoe.eval.suite import Suite, SuiteItem, load_suite, parse_completion, run_suite, score_answer

__all__ = [
    "EvalConfig", "EvalResult", "EvalSection", "Suite", "SuiteItem", "compare", "eval_from_cli",
    "evaluate_checkpoint", "heldout_loss", "load_eval_config", "load_suite", "parse_completion", "run_eval",
    "run_sanity", "run_suite", "score_answer",
]
