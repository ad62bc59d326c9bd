"""Upcycling: the chain of checkpoint objects from the donor to the vpMoE warm start (architecture.md 4 and 5).

    qwen3-0_6B --transplant--> qwen3-0_6B-o200k --surgery--> vpDense0-5_28.compat --morph--> vpDense0-5_28.real
               --expand--> vpDense --granular--> vpMoE

registry.py    configs/upcycle/objects.toml: what each object is and which step makes it from which parent
objects.py     weights hash, provenance, the input checks every step makes, staged output
hf.py          Hugging Face directories: facts, weights, tokenizer, forward
drift.py       the calibration batch and the drift report
transplant.py  step 1 (mergekit tokensurgeon)     surgery.py  step 2     morph.py  step 3
expand.py      step 4                             granular.py step 5
steps.py       the five steps behind one interface (STEPS)
run.py         `vpmoe upcycle CONFIG`
"""
