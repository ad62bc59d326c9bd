"""Performance tooling on the real training step: synthetic batches, step measurement, micro-batch autotuning and
profiling (`vpmoe autotune`, `vpmoe profile`, benchmarks/train_step.py)."""
