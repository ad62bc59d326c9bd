"""The span vocabulary: what each token's label says about supervision (one definition for the whole project).

A span label is aligned with a target token: label 0 means "no loss here", 1 the assistant's reasoning (analysis
channel), 2 its final answer (final channel). Data builds write them, the loader shifts them onto input positions,
losses are normalized per span, reports are split by span name.
"""

NONE, REASONING, FINAL = 0, 1, 2
NAMES = {NONE: "none", REASONING: "reasoning", FINAL: "final"}
SUPERVISED = {REASONING: "reasoning", FINAL: "final"}  # the spans that carry loss, by code
COUNT = len(NAMES)  # size of per-span tensors (index = span code)
