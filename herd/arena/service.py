"""The arena without HTTP: contestants in play, drawing pairs, running turns, votes, the boards.

The web app (herd.arena.web) and the judge (herd.arena.judge) both go through this, so a judge's battle is
stored exactly as a person's.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import defaultdict, deque
from typing import AsyncIterator

from herd.arena.board import Options, leaderboard
from herd.arena.contestants import Answer, Contestant
from herd.arena.store import Store

VOTES = {"a": "model_a", "b": "model_b", "tie": "tie", "bothbad": "tie (bothbad)"}
_draw = random.SystemRandom()  # voters must not be able to predict the pairing


class RateLimiter:
    """At most `limit` events per client in any `window` seconds."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit, self.window = limit, window
        self._events: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            q = self._events[client]
            while q and q[0] <= now - self.window:
                q.popleft()
            if len(q) >= self.limit:
                return False
            q.append(now)
            return True


def appearance_chances(weights: dict[int, float]) -> dict[int, float]:
    """P(contestant in a battle) when the first is drawn by weight and the second by weight among the rest."""
    total = sum(weights.values())
    if len(weights) < 2:
        return {k: 0.0 for k in weights}
    return {i: wi / total + sum(wj / total * wi / (total - wj) for j, wj in weights.items() if j != i)
            for i, wi in weights.items()}


class Arena:
    def __init__(self, store: Store, *, sampling: dict, max_tokens: int, provisional_votes: int = 30,
                 bootstrap_rounds: int = 200):
        self.store = store
        self.sampling = dict(sampling)
        self.max_tokens = max_tokens
        self.options = Options(rounds=bootstrap_rounds, provisional_votes=provisional_votes)
        self.playing: dict[int, Contestant] = {}  # contestant id -> live contestant
        self._boards: dict[str, tuple[int, dict]] = {}
        self._board_lock = threading.Lock()

    # -- contestants -----------------------------------------------------------------------------------
    def enter(self, contestant: Contestant) -> int:
        cid = self.store.add_contestant(contestant.name, contestant.fingerprint, contestant.kind,
                                        contestant.verified, contestant.source)
        old = self.playing.get(cid)
        self.playing[cid] = contestant
        if old is not None and old is not contestant:
            old.close()
        return cid

    def retire(self, cid: int) -> bool:
        contestant = self.playing.pop(cid, None)
        if contestant is not None:
            contestant.close()
        return self.store.retire(cid)

    def retire_absent(self) -> list[str]:
        """Mark as retired every served contestant of the record that is not in play now (a variant whose
        weights were replaced, one no longer configured); imported ones were never served. Returns names."""
        retired = []
        for c in self.store.contestants():
            if c["id"] not in self.playing and c["retired_at"] is None and c["kind"] != "imported":
                self.store.retire(c["id"])
                retired.append(f"{c['name']}@{c['fingerprint'][:12]}")
        return retired

    def sampling_table(self) -> list[dict]:
        """The public sampling rates: every contestant in play with its weight and chance of a battle."""
        weights = {cid: c.weight for cid, c in self.playing.items()}
        chance = appearance_chances(weights)
        return [{"name": c.name, "fingerprint": c.fingerprint, "verified": c.verified, "kind": c.kind,
                 "weight": c.weight, "chance_in_battle": chance[cid]} for cid, c in self.playing.items()]

    def draw(self) -> tuple[int, int]:
        ids = list(self.playing)
        if len(ids) < 2:
            raise LookupError("the arena needs at least two contestants in play")
        a = _draw.choices(ids, weights=[self.playing[i].weight for i in ids])[0]
        rest = [i for i in ids if i != a]
        b = _draw.choices(rest, weights=[self.playing[i].weight for i in rest])[0]
        return a, b

    # -- battles ---------------------------------------------------------------------------------------
    def start(self, client: str, board: str = "human", pair: tuple[int, int] | None = None) -> str:
        a, b = pair or self.draw()
        return self.store.create_battle(board, a, b, dict(self.sampling, max_tokens=self.max_tokens), client)

    async def turn(self, uid: str, prompt: str) -> AsyncIterator[tuple[str, str | None, str | None]]:
        """Both contestants answer `prompt` (the next user turn) at once: yields (side, text, None) pieces as
        they come and (side, None, error or None) at each side's end; then the battle holds both
        conversations."""
        battle = self.store.battle(uid)
        sides = {"a": self.playing.get(battle["contestant_a"]), "b": self.playing.get(battle["contestant_b"])}
        convs = {s: battle[f"conversation_{s}"] + [{"role": "user", "content": prompt}] for s in "ab"}
        answers = {"a": Answer(tokens=battle["tokens_a"]), "b": Answer(tokens=battle["tokens_b"])}
        queue: asyncio.Queue = asyncio.Queue()
        sampling = {k: v for k, v in battle["sampling"].items() if k != "max_tokens"}

        async def run(side):
            contestant, answer = sides[side], Answer()
            try:
                if contestant is None:
                    answer.error = "this contestant has been retired"
                else:
                    async for piece in contestant.stream(convs[side], sampling, battle["sampling"]["max_tokens"],
                                                         answer):
                        await queue.put((side, piece, None))
            finally:
                answers[side].text = answer.text
                answers[side].error = answer.error
                answers[side].tokens += answer.tokens
                await queue.put((side, None, answer.error))

        tasks = [asyncio.create_task(run(s)) for s in "ab"]
        try:
            finished = 0
            while finished < 2:
                side, piece, error = await queue.get()
                finished += piece is None
                yield side, piece, error
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for s in "ab":
            convs[s].append({"role": "assistant", "content": answers[s].text})
        await asyncio.to_thread(self.store.save_answers, uid, convs["a"], convs["b"], answers["a"].tokens,
                                answers["b"].tokens)

    def vote(self, uid: str, winner: str, voter: str) -> bool:
        return self.store.vote(uid, VOTES[winner], voter)

    def reveal(self, uid: str) -> dict:
        battle = self.store.battle(uid)
        by_id = {c["id"]: c for c in self.store.contestants()}
        return {s: {k: by_id[battle[f"contestant_{s}"]][k] for k in ("name", "fingerprint", "verified", "kind")}
                for s in "ab"}

    # -- boards ----------------------------------------------------------------------------------------
    def board(self, board: str = "human") -> dict:
        """The board's leaderboard, recomputed only when its vote count changed."""
        with self._board_lock:
            votes = self.store.count_votes(board)
            cached = self._boards.get(board)
            if cached and cached[0] == votes:
                return cached[1]
            facts = {(c["name"], c["fingerprint"]): {"verified": c["verified"], "retired": c["retired_at"] is not None,
                                                     "kind": c["kind"]} for c in self.store.contestants()}
            result = leaderboard(self.store.records(board), self.options, contestants=facts)
            result["board"] = board
            self._boards[board] = (votes, result)
            return result

    def close(self):
        for c in self.playing.values():
            c.close()
        self.store.close()
