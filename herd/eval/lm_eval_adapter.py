"""herd as a model of EleutherAI's lm-evaluation-harness (an optional extra: `pip install lm-eval`).

    from herd.eval.lm_eval_adapter import HerdLM
    lm_eval.simple_evaluate(model=HerdLM(llm), tasks=["hellaswag"])    # or --model herd with lm-eval's CLI

The three request kinds go through herd's engine in one batch each. Tokenization follows lm-eval's
HF model (HFLM) so that scores are comparable with `--model hf`: pairs by lm-eval's own `_encode_pair`
rule (trailing context whitespace moves to the continuation; whole minus context), the model's default
BOS unless `add_bos_token` says otherwise, the prefix token BOS (else EOS) for an empty context, and
lm-eval's own rolling windows for `loglikelihood_rolling`.
"""

from __future__ import annotations

from herd.errors import HerdError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the adapter is the only module that needs lm-eval
    raise HerdError("the lm-eval adapter needs lm-evaluation-harness: pip install 'llama-herd[lm-eval]'") from e

from herd.eval.backends import EngineBackend, GenerateRequest


@register_model("herd")
class HerdLM(LM):
    def __init__(self, llm=None, pretrained: str | None = None, batch_size: int | str = 16,
                 add_bos_token: bool | None = None, max_length: int | None = None, dtype: str | None = None,
                 device: str | None = None, **kwargs):
        super().__init__()
        if llm is None:
            import herd

            llm = herd.load(pretrained, dtype=dtype, device=device)
        self.llm = llm
        self.backend = EngineBackend(llm, int(batch_size) if str(batch_size).isdigit() else 16)
        self.add_bos_token = add_bos_token
        self.max_length = max_length or llm.config.max_seq_len - 1  # the engine feeds the last token too

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"})
        return cls(**args)

    def _encode(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text, bos=self.add_bos_token)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.backend.prefix_token_id], self.llm.tokenizer.encode(continuation, bos=False)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return whole[:len(ctx)], whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        return [(r.logprob, r.greedy) for r in self.backend.loglikelihoods(pairs)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, r in enumerate(requests):
            tokens = self._encode(r.args[0])
            for w in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.backend.prefix_token_id, self.max_length, 1)):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, r in zip(owner, self.backend.loglikelihoods(windows, greedy=False)):
            totals[i] += r.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        gens = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            gens.append(GenerateRequest(prompt=context, max_tokens=int(kwargs.pop("max_gen_toks", 256)),
                                        stop=tuple(until), temperature=temperature))
        return [g.text for g in self.backend.generate(gens)]


def run_lm_eval(llm, tasks: list[str], limit: int | None = None, batch_size: int = 16, seed: int = 0,
                include_path: str | None = None, num_fewshot: int | None = None) -> dict:
    """lm-eval's simple_evaluate on herd; the results dict lm-eval returns."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else None
    return lm_eval.simple_evaluate(model=HerdLM(llm, batch_size=batch_size), tasks=tasks, limit=limit,
                                   num_fewshot=num_fewshot, task_manager=manager, random_seed=seed,
                                   numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                   log_samples=True)


def report_tasks(results: dict) -> list[dict]:
    """lm-eval's results as herd report tasks: metrics with stderr and n, and per item the prompt hash,
    the responses, the target and the scores lm-eval logged."""
    import lm_eval

    out = []
    for name, r in results["results"].items():
        n = (results.get("n-samples", {}).get(name) or {}).get("effective")
        metrics = {}
        for key, value in r.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = r.get(f"{metric}_stderr,{filt}")
            label = metric if filt == "none" else f"{metric},{filt}"
            metrics[label] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None, "n": n}
        items = []
        for sample in results.get("samples", {}).get(name, []):
            items.append({"id": f"doc-{sample['doc_id']}", "prompt_sha256": sample.get("prompt_hash"),
                          "output": sample.get("filtered_resps"), "answer": None, "target": sample.get("target"),
                          "score": {m: sample[m] for m in metrics if m in sample}})
        out.append({"definition": {"task": f"lm-eval:{name}", "kind": "lm-eval", "lm_eval_version": lm_eval.__version__,
                                   "config": results.get("configs", {}).get(name)},
                    "data": {}, "metrics": metrics, "items": items, "tables": {}, "compute": {}, "plots": {}})
    return out
