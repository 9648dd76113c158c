"""Battles without people: a judge model compares two answers, each pair in both orders.

The judge reads the question and both answers and ends with [[A]], [[B]] or [[C]] (a tie), the verdict
format of MT-Bench's pairwise judge. Every pair of contestants answers every prompt once; the judge then
sees the answers as (A, B) and again as (B, A), and both verdicts are stored as battles on the judge
board, so a judge that favours the first position gives each contestant that favour equally.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from dataclasses import dataclass, field

from herd.arena.contestants import Answer, Contestant
from herd.arena.service import Arena

SYSTEM = ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
          "assistants to the user question displayed below. Choose the assistant that follows the user's "
          "instructions and answers the user's question better. Do not let the order in which the responses "
          "were presented, their length, or the assistants' names influence your decision. After a short "
          "explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant A "
          "is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.")
TEMPLATE = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
            "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
            "[The End of Assistant B's Answer]")
VERDICT = re.compile(r"\[\[([ABC])\]\]")
WINNER = {"A": "a", "B": "b", "C": "tie"}


def verdict(text: str) -> str | None:
    """"a", "b" or "tie" from the judge's last [[A]]/[[B]]/[[C]]; None when it gave none."""
    found = VERDICT.findall(text)
    return WINNER[found[-1]] if found else None


@dataclass
class JudgeRun:
    battles: int = 0
    unparsed: int = 0  # judgements without a verdict (not stored)
    errors: list[str] = field(default_factory=list)


async def _answer(contestant: Contestant, messages, sampling, max_tokens) -> Answer:
    answer = Answer()
    async for _ in contestant.stream(messages, sampling, max_tokens, answer):
        pass
    return answer


async def judge_prompts(arena: Arena, judge: Contestant, prompts: list[str], *, judge_tokens: int = 512) -> JudgeRun:
    run = JudgeRun()
    voter = f"judge:{judge.name}@{judge.fingerprint[:16]}"
    ids = list(arena.playing)
    for prompt in prompts:
        for a, b in itertools.combinations(ids, 2):
            first = arena.start("judge", board="judge", pair=(a, b))
            async for _ in arena.turn(first, prompt):
                pass
            answered = arena.store.battle(first)
            second = arena.start("judge", board="judge", pair=(b, a))  # the same answers, sides swapped
            arena.store.save_answers(second, answered["conversation_b"], answered["conversation_a"],
                                     answered["tokens_b"], answered["tokens_a"])
            for uid in (first, second):
                battle = arena.store.battle(uid)
                question = TEMPLATE.format(question=prompt, answer_a=battle["conversation_a"][-1]["content"],
                                           answer_b=battle["conversation_b"][-1]["content"])
                judged = await _answer(judge, [{"role": "system", "content": SYSTEM},
                                               {"role": "user", "content": question}],
                                       {"temperature": 0.0}, judge_tokens)
                if judged.error:
                    run.errors.append(judged.error)
                choice = verdict(judged.text)
                if choice is None:
                    run.unparsed += 1
                    continue
                if arena.vote(uid, choice, voter):
                    run.battles += 1
    return run


def run_judge(arena: Arena, judge: Contestant, prompts: list[str], **kwargs) -> JudgeRun:
    return asyncio.run(judge_prompts(arena, judge, prompts, **kwargs))
