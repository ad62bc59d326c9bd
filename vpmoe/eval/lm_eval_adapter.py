"""Our model as an lm-evaluation-harness LM (registered as "vpmoe"), for running standard tasks.

    import vpmoe.eval.lm_eval_adapter            # registers the model name "vpmoe"
    import lm_eval
    lm_eval.simple_evaluate(model="vpmoe", model_args="checkpoint=runs/ce,max_length=2048", tasks=[...])

or from the shell (the harness's own CLI, with the model registered first; see vpmoe.eval.harness):

    python -m vpmoe.eval.harness run --model vpmoe --model_args checkpoint=runs/ce --tasks hellaswag --batch_size 8

model_args: checkpoint (run dir, training checkpoint or checkpoint object), device ("auto", "cpu", "cuda", ...),
dtype ("auto", "float32", "bfloat16"), max_length (context window; longer inputs keep their end),
max_gen_toks (default generation budget), harmony (default false), reasoning_effort (with harmony); the
harness's own --batch_size / --device options set batch size and device.

Plain mode (default): texts are encoded with the o200k tokenizer as is; `<|endoftext|>` (199999) is the
prefix token for empty contexts and rolling windows and the stop token of generation.
Harmony mode (`harmony=true`): the context becomes the user message of a Harmony prompt (system with the
reasoning effort + user + `<|start|>assistant`); loglikelihood scores the continuation (leading whitespace
removed) as the start of the final channel (`<|channel|>final<|message|>` is appended to the context);
generate_until decodes until `<|return|>` and returns the final-channel text. loglikelihood_rolling is
always plain text (perplexity of a document has no conversation).
"""

from __future__ import annotations

import json

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from vpmoe import tokenizer as tk
from vpmoe.artifacts.models import load_model
from vpmoe.distributed import resolve_device
from vpmoe.errors import UserError
from vpmoe.model.kernels import compute_dtype

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@register_model("vpmoe")
class VpmoeLM(TemplateLM):
    def __init__(self, checkpoint: str | None = None, model: torch.nn.Module | None = None, device: str = "auto",
                 dtype: str = "auto", batch_size: int | str = 8, max_length: int = 2048, max_gen_toks: int = 256,
                 harmony: bool | str = False, reasoning_effort: str = "medium", max_batch_size: int | None = None,
                 **unused):
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise UserError("VpmoeLM needs exactly one of checkpoint= (a path) or model= (a loaded Transformer)")
        if model is None:
            device = str(device or "auto")
            if device == "auto":
                device = str(resolve_device("auto"))
            if dtype == "auto":
                torch_dtype = compute_dtype("auto", torch.device(device))
            elif dtype in DTYPES:
                torch_dtype = DTYPES[dtype]
            else:
                raise UserError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
            model = load_model(checkpoint, device=device, dtype=torch_dtype)
        self.model = model.eval()
        self._device = next(model.parameters()).device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" falls back to 8
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.harmony = _as_bool(harmony)
        self.reasoning_effort = reasoning_effort
        if self._max_length < 2:
            raise UserError("max_length must be at least 2")

    # ------------------------------------------------------------------------------------ tokenizer plumbing

    @property
    def eot_token_id(self) -> int:
        return tk.EOD

    @property
    def prefix_token_id(self) -> int:
        return tk.EOD

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "o200k_harmony"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return tk.encode(string)

    def tok_decode(self, tokens) -> str:
        return tk.decode(tokens)

    def _harmony_prompt(self, context: str) -> list[int]:
        from vpmoe.eval.suite import prompt_tokens

        return prompt_tokens(context, self.reasoning_effort)

    # ------------------------------------------------------------------------------------------- scoring

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not self.harmony:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        final_head = [tk.CHANNEL, *tk.encode("final"), tk.MESSAGE]
        encoded = []
        for request in requests:
            context, continuation = request.args
            encoded.append(((context, continuation), self._harmony_prompt(context) + final_head,
                            self.tok_encode(continuation.lstrip())))
        return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key or None, context tokens, continuation tokens) -> (sum log p, all greedy)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        prepared = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                results[i] = (0.0, True)
                continue
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens is longer than max_length "
                                f"{self.max_length}")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            prepared.append((i, whole[:-1], list(continuation)))
        prepared.sort(key=lambda p: -len(p[1]))  # similar lengths share a batch
        for first in range(0, len(prepared), self.batch_size):
            batch = prepared[first:first + self.batch_size]
            width = max(len(inp) for _, inp, _ in batch)
            ids = torch.full((len(batch), width), tk.EOD, dtype=torch.long)
            for row, (_, inp, _) in enumerate(batch):
                ids[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)  # right padding: causal, never attended
            positions = torch.arange(width).expand(len(batch), width)
            hidden = self.model.body(ids.to(self.device), positions.to(self.device),
                                     torch.zeros_like(ids).to(self.device)).hidden
            for row, (i, inp, continuation) in enumerate(batch):
                n = len(continuation)  # the head only where a continuation token is predicted
                logprobs = self.model.head(hidden[row, len(inp) - n:len(inp)]).float().log_softmax(-1)
                target = torch.tensor(continuation, device=logprobs.device)
                total = float(logprobs.gather(1, target[:, None]).double().sum())
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[i] = (total, greedy)
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over every token of each text, in disjoint windows of max_length (each token scored
        once, with as much context as fits), starting from `<|endoftext|>`."""
        windows, owners = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, context, target))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ----------------------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from vpmoe.eval.suite import parse_completion
        from vpmoe.model import generate

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not _as_bool(kwargs.pop("do_sample", temperature > 0)):
                temperature = 0.0
            top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
            budget = max(1, self.max_length - max_new)
            prompts = []
            for i in indices:
                context = requests[i].args[0]
                ids = self._harmony_prompt(context) if self.harmony else self.tok_encode(context)
                prompts.append(ids[-budget:] or [self.prefix_token_id])
            stops = (tk.RETURN, tk.CALL) if self.harmony else (tk.EOD,)
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first:first + self.batch_size]
                gen = generate(self.model, prompts[first:first + self.batch_size], max_new, temperature=temperature,
                               top_k=None if top_k is None else int(top_k),
                               top_p=None if top_p is None else float(top_p), stop_ids=stops, pad_id=tk.EOD)
                for row, i in enumerate(chunk):
                    tokens = gen.tokens[row, : int(gen.lengths[row])].tolist()
                    if self.harmony:
                        text = parse_completion(tokens).final or ""
                    else:
                        text = self.tok_decode([t for t in tokens if t not in stops])
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]
