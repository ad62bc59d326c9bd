"""lm-evaluation-harness's own command line with our model registered as "vpmoe":

    python -m vpmoe.eval.harness run --model vpmoe --model_args checkpoint=runs/ce --tasks hellaswag --batch_size 8
    python -m vpmoe.eval.harness run --model vpmoe --model_args checkpoint=runs/ce,harmony=true --tasks gsm8k

Everything after the module name is the harness's CLI (`lm_eval --help`); see vpmoe.eval.lm_eval_adapter for
the model_args.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import vpmoe.eval.lm_eval_adapter  # noqa: F401  (registers "vpmoe")

    cli_evaluate()


if __name__ == "__main__":
    main()
