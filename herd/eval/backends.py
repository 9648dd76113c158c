"""Where scores come from: herd's batching engine in this process, or an OpenAI-compatible HTTP endpoint.

Both answer the same two questions, at the token level so that the two can be compared exactly:
- `loglikelihoods([(context_ids, continuation_ids), ...])`: the summed log-probability of each
  continuation given its context, and whether it is the greedy continuation;
- `generate([GenerateRequest, ...])`: text completions (greedy, or seeded samples).

In-process, every request goes to one herd.engine.Engine at once: up to `batch_size` sequences are
admitted together, their prompts prefilled in the same engine step and their decodes batched into one
forward per step. Log-likelihood requests are prompt-only (max_tokens 0, prompt_logprobs) and the prefill
budget holds every admitted prompt whole, so each prompt is computed in one unchunked forward of its own
tokens: its log-likelihoods do not depend on the batch size or on which other items share the step.
Generation batches the decode step across sequences, whose matrix products may round differently at
different batch sizes (see DETERMINISM).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence

from herd.errors import ContextOverflow, HerdError
from herd.eval.data import sha256_json

Progress = Callable[[int], None]  # called with how many more requests just finished

DETERMINISM = {
    "loglikelihood": "batched scoring (the default): a context shared by several continuations runs once and "
                     "its continuations from its end, through a KV cache (herd.engine.scoring); other "
                     "requests are sorted longest first and right-padded into "
                     "[B, T] forwards; padding after a row cannot reach its positions (causal attention), but "
                     "which rows share a forward changes the shapes of the matrix products, so log-likelihoods "
                     "differ between batch sizes in the last bits (float32: within 1e-6 relative, measured by "
                     "tests/test_eval.py), which moves a decision only between choices that tie that closely; "
                     "engine scoring (--scoring engine): the engine prefills the prompts of one step together, "
                     "right-padded into groups of similar length (herd.engine.runner.prefill_groups), so the "
                     "same bound holds: which prompts share a forward depends on the batch size and on arrival "
                     "order, as it does in herd serve",
    "generate": "the decode step runs the batch's sequences as one [B, 1] forward; matrix products of "
                "different B may round the last bits differently, which can flip a greedy choice only where "
                "two tokens' logits tie within that rounding (about 1e-6 relative in float32, 1e-2 in "
                "bfloat16); identical at a fixed batch size and seed",
}


class BackendError(HerdError):
    """The scorer cannot answer a request (a server error, or a server that answers the wrong thing)."""


class NonFiniteScore(BackendError):
    """The model gave a log-likelihood that is NaN or infinite: its weights or its arithmetic are broken."""


def check_finite(results: list, pairs) -> list:
    """`results`, or NonFiniteScore naming the first request whose log-likelihood is not a finite number (a
    report cannot hold it, and a score built on it means nothing)."""
    bad = [i for i, r in enumerate(results) if r is not None and not math.isfinite(r.logprob)]
    if bad:
        raise NonFiniteScore(f"the model gave a log-likelihood of {results[bad[0]].logprob} for request {bad[0]} "
                             f"({len(pairs[bad[0]][1])} continuation tokens), and {len(bad) - 1} more non-finite of "
                             f"{len(results)}: its weights or arithmetic are broken (NaN or inf in the weights?); "
                             "nothing scored")
    return results


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str | None = None  # plain-text prompt (tokenized with the model's default BOS)
    messages: list | None = None  # or an OpenAI-shaped conversation, rendered by the model's chat format
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class GenerateResult:
    text: str
    prompt_sha256: str  # of the token ids the model saw (of the text or messages on a server)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Loglikelihood:
    logprob: float  # summed log-probability of the continuation
    greedy: bool  # every continuation token was the most likely one
    token_logprobs: list[float] = field(default_factory=list)


class EngineBackend:
    """A loaded herd.LLM in this process. Log-likelihoods: `scoring="batched"` (default) runs each context
    that several continuations share once, with the continuations from its end (herd.engine.scoring), and
    the other requests `batch_size` at a time, longest first and right-padded, as one [B, T] forward of
    herd.LLM.logits (causal attention: padding after a row's last token cannot change its earlier
    positions); `scoring="engine"`
    submits every request to herd's engine as a prompt-only request with prompt logprobs (the engine's
    batched prefill, as herd serve runs it). Generation always runs on the engine."""

    kind = "in-process"
    logits_budget = 1 << 28  # most float32 logits one batched forward may return (1 GiB)

    def __init__(self, llm, batch_size: int = 16, scoring: str = "batched"):
        if scoring not in ("batched", "engine"):
            raise ValueError(f"scoring must be 'batched' or 'engine', got {scoring!r}")
        self.llm = llm
        self.batch_size = batch_size
        self.scoring = scoring
        self.context = llm.config.max_seq_len
        tok = llm.tokenizer
        self.prefix_token_id = tok.bos_id if tok.bos_id is not None else tok.eos_id

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        return self.llm.tokenizer.encode(text, bos=bos)

    def decode(self, ids: list[int]) -> str:
        return self.llm.tokenizer.decode(ids)

    def _engine(self, longest: int):
        from herd.engine import Engine

        context = min(self.context, -(-longest // 16) * 16)
        return Engine(self.llm.model, self.llm.tokenizer, max_batch=self.batch_size, context=context,
                      max_queue=1 << 30, prefill_budget=self.batch_size * context)

    def _run(self, requests: list, progress: Progress | None, longest: int | None = None) -> dict[str, list]:
        """Queue every request, step until all finish; the outputs of each request in order. `longest`: the
        longest request the engine is sized for (default: these requests' own)."""
        engine = self._engine(longest or max(len(r.prompt_ids) + r.max_tokens for r in requests))
        outputs: dict[str, list] = {r.request_id: [] for r in requests}
        for r in requests:
            engine.add_request(r)
        while engine.has_work():
            for out in engine.step():
                outputs[out.request_id].append(out)
                if out.error:
                    raise BackendError(f"request {out.request_id} failed in the engine: {out.error}")
                if out.finished and progress:
                    progress(1)
        return outputs

    def loglikelihoods(self, pairs: Sequence[tuple[list[int], list[int]]], progress: Progress | None = None,
                       greedy: bool = True, wanted: set[int] | None = None) -> list[Loglikelihood | None]:
        """Every pair's log-likelihood; with `wanted` (indices), only those pairs' (the others None), computed
        in exactly the forwards that scoring every pair runs them in: the same rows share each forward, so
        the values are the same bits (what `herd eval verify` relies on to re-score a sample)."""
        from herd.engine import Request

        requests = []
        for i, (context, continuation) in enumerate(pairs):
            if not context or not continuation:
                raise ValueError(f"request {i}: context and continuation must both hold tokens")
            ids = list(context) + list(continuation)
            if len(ids) > self.context:
                raise ContextOverflow(f"request {i}: {len(ids)} tokens exceed the model's context of {self.context}")
            requests.append(Request(f"ll-{i}", ids, max_tokens=0, prompt_logprobs=1 if greedy else 0))
        if not requests:
            return []
        if self.scoring == "batched":
            return check_finite(self._batched(pairs, progress, wanted), pairs)
        longest = max(len(r.prompt_ids) for r in requests)
        if wanted is not None:
            # The engine admits batch_size requests per step in arrival order and every prompt-only request
            # finishes in the step that prefills it, so step k runs requests k*B .. (k+1)*B - 1 together:
            # the steps holding a wanted request, run alone, compute what the whole run computed there.
            steps = {i // self.batch_size for i in wanted}
            requests = [r for i, r in enumerate(requests) if i // self.batch_size in steps]
        outputs = self._run(requests, progress, longest) if requests else {}
        results: list[Loglikelihood | None] = [None] * len(pairs)
        for r in requests:
            i = int(r.request_id.removeprefix("ll-"))
            context = pairs[i][0]
            lps = next(o.prompt_logprobs for o in outputs[r.request_id] if o.prompt_logprobs is not None)
            tail = lps[len(context):]
            results[i] = Loglikelihood(sum(t.logprob for t in tail),
                                       all(t.top and t.top[0][0] == t.token_id for t in tail) if greedy else False,
                                       [t.logprob for t in tail])
        if wanted is not None:
            results = [r if i in wanted else None for i, r in enumerate(results)]
        return check_finite(results, pairs)

    def _batched(self, pairs, progress: Progress | None, wanted: set[int] | None = None) -> list[Loglikelihood]:
        from herd.engine.scoring import continuation_logprobs

        # A context with several continuations (a question's choices) runs once, its continuations from
        # its end (herd.engine.scoring): four choices cost one context and four short tails. Pairs whose
        # context is theirs alone (perplexity windows) run whole, as plain causal rows.
        count: dict[tuple, int] = {}
        for context, _ in pairs:
            count[tuple(context)] = count.get(tuple(context), 0) + 1
        shared = [i for i, (c, _) in enumerate(pairs) if count[tuple(c)] > 1]
        alone = [i for i, (c, _) in enumerate(pairs) if count[tuple(c)] == 1]
        results: list[Loglikelihood | None] = [None] * len(pairs)
        def positions(indices):  # the wanted pairs, as positions in `indices`
            return None if wanted is None else {k for k, i in enumerate(indices) if i in wanted}

        if shared:
            scored = continuation_logprobs(self.llm.model, [pairs[i] for i in shared], self.batch_size,
                                           max(1, self.logits_budget), progress, wanted=positions(shared))
            for i, one in zip(shared, scored):
                if one is not None:
                    lps, greedy = one
                    results[i] = Loglikelihood(sum(lps), greedy, lps)
        if alone:
            for i, r in zip(alone, self._padded([pairs[i] for i in alone], progress, positions(alone))):
                results[i] = r
        if wanted is not None:
            results = [r if i in wanted else None for i, r in enumerate(results)]
        return results

    def _padded(self, pairs, progress: Progress | None, wanted: set[int] | None = None) -> list[Loglikelihood]:
        """Each pair as one right-padded row of [B, T] forwards of herd.LLM.logits."""
        import torch

        # The model reads context + continuation less its last token. Requests whose input is a prefix
        # of another's with the same context (all single-token choices of one question, say) are read
        # off that one's row: causal attention makes a prefix's logits the same positions' logits.
        inputs = [(list(c) + list(x))[:-1] for c, x in pairs]
        carrier: dict[int, int] = {}
        by_context: dict[tuple, list[int]] = {}
        for i in sorted(range(len(pairs)), key=lambda i: -len(inputs[i])):
            group = by_context.setdefault(tuple(pairs[i][0]), [])
            n = len(inputs[i])
            carrier[i] = next((j for j in group if inputs[j][:n] == inputs[i]), i)
            if carrier[i] == i:
                group.append(i)
        rows_needed = sorted({c for c in carrier.values()}, key=lambda i: -len(inputs[i]))
        riders: dict[int, list[int]] = {}
        for i, c in carrier.items():
            riders.setdefault(c, []).append(i)
        budget = max(1, self.logits_budget // self.llm.config.vocab_size)
        results: list[Loglikelihood | None] = [None] * len(pairs)
        start = 0
        while start < len(rows_needed):
            rows = max(1, min(self.batch_size, budget // len(inputs[rows_needed[start]])))
            group = rows_needed[start:start + rows]
            start += len(group)
            if wanted is not None and not any(i in wanted for c in group for i in riders[c]):
                continue  # a forward that holds no wanted pair is skipped; the others run as in the whole run
            width = len(inputs[group[0]])
            tokens = torch.tensor([inputs[i] + [0] * (width - len(inputs[i])) for i in group], dtype=torch.long)
            logits = self.llm.logits(tokens)  # [B, T, V] float32
            for row, c in enumerate(group):
                for i in riders[c]:
                    context, continuation = pairs[i]
                    at = torch.arange(len(context) - 1, len(context) - 1 + len(continuation))
                    logprobs = torch.log_softmax(logits[row, at].float(), dim=-1)
                    target = torch.tensor(continuation)
                    chosen = logprobs.gather(1, target[:, None])[:, 0].tolist()
                    results[i] = Loglikelihood(sum(chosen), bool((logprobs.argmax(-1) == target).all()), chosen)
                if progress:
                    progress(len(riders[c]))
            del logits
        return results

    def prompt_ids(self, g: GenerateRequest) -> list[int]:
        return self.llm.chat_prompt(g.messages) if g.messages is not None else self.encode(g.prompt)

    def prompt_facts(self, g: GenerateRequest) -> tuple[str, int | None]:
        """What a completion's record says of its prompt, without generating: its hash, and its length in
        tokens (None where only the model's answer tells)."""
        ids = self.prompt_ids(g)
        return sha256_json(ids), len(ids)

    def generate(self, requests: Sequence[GenerateRequest], progress: Progress | None = None) -> list[GenerateResult]:
        from herd.engine import Request
        from herd.sampling import SamplingParams

        llm, engine_requests, prompts = self.llm, [], []
        for i, g in enumerate(requests):
            ids = self.prompt_ids(g)
            if len(ids) + g.max_tokens > self.context:
                raise ContextOverflow(f"request {i}: a {len(ids)}-token prompt plus {g.max_tokens} tokens to generate "
                                      f"exceed the model's context of {self.context}")
            stop_ids, stops = set(llm.stop_ids), list(g.stop)
            if g.messages is not None:
                stop_ids |= set(llm.chat_format.stop_token_ids(llm.tokenizer))
                stops += list(llm.chat_format.stop_texts)
            params = SamplingParams(temperature=g.temperature, seed=g.seed)
            engine_requests.append(Request(f"gen-{i}", ids, g.max_tokens, params, frozenset(stop_ids), tuple(stops)))
            prompts.append(ids)
        if not engine_requests:
            return []
        outputs = self._run(engine_requests, progress)
        results = []
        for r, ids in zip(engine_requests, prompts):
            outs = outputs[r.request_id]
            results.append(GenerateResult("".join(o.text for o in outs), sha256_json(ids), len(ids),
                                          sum(len(o.token_ids) for o in outs)))
        return results

    def model_record(self, source) -> dict:
        from herd.eval.provenance import model_record

        return model_record(self.llm, source)

    def runtime_record(self) -> dict:
        from herd.eval.provenance import runtime_record

        return {**runtime_record(self.llm, self.kind, self.batch_size), "scoring": self.scoring}


class ServerBackend:
    """An OpenAI-compatible endpoint (herd serve, vLLM, llama.cpp's server ...): /v1/completions with echo
    and logprobs for log-likelihoods, /tokenize for the token ids, so prompts go as ids and the continuation
    is cut at exactly the token where it starts. `batch_size` prompts go in one request."""

    kind = "server"

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, batch_size: int = 16,
                 timeout: float = 600.0):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.api_key, self.batch_size, self.timeout = api_key, batch_size, timeout
        cards = self._call("GET", "/v1/models").get("data") or []
        if model is None:
            if not cards:
                raise BackendError(f"{self.url}/v1/models lists no model; name one with --model")
            model = cards[0]["id"]
        self.model = model
        self.card = next((c for c in cards if c.get("id") == model), None)
        probe = self._call("POST", "/tokenize", {"model": model, "prompt": "", "add_special_tokens": True})
        self.context = probe.get("max_model_len")
        self.prefix_token_id = probe["tokens"][0] if probe.get("tokens") else None

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise BackendError(f"{method} {self.url}{path}: HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise BackendError(f"{method} {self.url}{path}: {e.reason}") from None

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self._call("POST", "/tokenize", {"model": self.model, "prompt": text,
                                                "add_special_tokens": bos is not False})["tokens"]
        if bos and (not ids or ids[0] != self.prefix_token_id) and self.prefix_token_id is not None:
            ids = [self.prefix_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._call("POST", "/detokenize", {"model": self.model, "tokens": list(ids)})["prompt"]

    def _check_context(self, i: int, n: int) -> None:
        if self.context is not None and n > self.context:
            raise ContextOverflow(f"request {i}: {n} tokens exceed the server's context of {self.context}")

    def loglikelihoods(self, pairs, progress: Progress | None = None, greedy: bool = True,
                       wanted: set[int] | None = None) -> list[Loglikelihood | None]:
        """With `wanted`, only those pairs (the others None), in chunks of their own: a server's batching is
        not reproduced."""
        if wanted is not None:
            chosen = sorted(i for i in wanted if 0 <= i < len(pairs))
            out: list[Loglikelihood | None] = [None] * len(pairs)
            for i, r in zip(chosen, self.loglikelihoods([pairs[i] for i in chosen], progress, greedy)):
                out[i] = r
            return out
        results = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            prompts = [list(c) + list(x) for c, x in chunk]
            for i, p in enumerate(prompts):
                self._check_context(start + i, len(p))
            body = {"model": self.model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
                    "temperature": 0}
            choices = sorted(self._call("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            if len(choices) != len(prompts):
                raise BackendError(f"the server answered {len(choices)} choices for {len(prompts)} prompts")
            for (context, continuation), ids, c in zip(chunk, prompts, choices):
                lp = c.get("logprobs") or {}
                values = lp.get("token_logprobs") or []
                # An echo that returns generated-token logprobs instead of the prompt's would score every
                # choice alike and silently put multiple-choice at chance: refuse anything but one value per
                # prompt token, the first empty.
                if len(values) != len(ids) or values[0] is not None:
                    raise BackendError(
                        f"the server's echo gave {len(values)} logprobs for a {len(ids)}-token prompt (first "
                        f"{values[0] if values else 'missing'!r}); it does not return prompt logprobs as "
                        "/v1/completions echo=true, logprobs, max_tokens=0 must")
                tail = values[len(context):]
                tops = (lp.get("top_logprobs") or [None] * len(ids))[len(context):]
                is_greedy = all(t is not None and v >= max(t.values()) - 1e-6 for v, t in zip(tail, tops))
                results.append(Loglikelihood(float(sum(tail)), is_greedy, [float(v) for v in tail]))
            if progress:
                progress(len(chunk))
        return check_finite(results, pairs)

    def prompt_facts(self, g: GenerateRequest) -> tuple[str, int | None]:
        return sha256_json(g.messages if g.messages is not None else g.prompt), None  # its usage counts tokens

    def _generate_one(self, g: GenerateRequest) -> GenerateResult:
        common = {"model": self.model, "max_tokens": g.max_tokens, "temperature": g.temperature}
        if g.seed is not None:
            common["seed"] = g.seed
        if g.stop:
            common["stop"] = list(g.stop)[:4]  # OpenAI accepts up to 4 stop strings
        if g.messages is not None:
            r = self._call("POST", "/v1/chat/completions", dict(common, messages=g.messages))
            text = r["choices"][0]["message"].get("content") or ""
        else:
            r = self._call("POST", "/v1/completions", dict(common, prompt=g.prompt))
            text = r["choices"][0]["text"]
        usage = r.get("usage") or {}
        return GenerateResult(text, self.prompt_facts(g)[0], usage.get("prompt_tokens", 0),
                              usage.get("completion_tokens", 0))

    def generate(self, requests: Sequence[GenerateRequest], progress: Progress | None = None) -> list[GenerateResult]:
        """`batch_size` requests in flight at once, so the server can batch them."""
        from concurrent.futures import ThreadPoolExecutor

        def one(g):
            result = self._generate_one(g)
            if progress:
                progress(1)
            return result

        with ThreadPoolExecutor(self.batch_size) as pool:
            return list(pool.map(one, requests))

    def model_record(self, source) -> dict:
        from herd.eval.provenance import unknown_model_record

        return unknown_model_record(self.url, self.model, self.card)

    def runtime_record(self) -> dict:
        from herd.eval.provenance import runtime_record

        return runtime_record(None, self.kind, self.batch_size, self.url)
