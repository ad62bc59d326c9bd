"""Teacher scoring: a teacher causal LM's top-K log-probabilities for every supervised position of a dataset.

- `vpmoe.teacher.score`     `vpmoe teacher score CONFIG`: sharded, resumable, data-parallel scoring and the merge.
- `vpmoe.teacher.sidecar`   the sidecar layout and `TeacherSidecar`, the checked reader `kd_offline` uses.
- `vpmoe.teacher.load`      loading a local Hugging Face teacher after checking its vocabulary against ours.
- `vpmoe.teacher.topk`      chunked full-vocabulary log-softmax -> top-K, target log-prob, entropy.
- `vpmoe.teacher.documents` packed samples -> documents -> length-bucketed batches.
"""
