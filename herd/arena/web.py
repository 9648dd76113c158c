"""The arena's web app: a battle page, a leaderboard page, and the JSON/SSE API they use (FastAPI).

Flow: GET / sets a session cookie and embeds its CSRF token; POST /api/battle draws a pair and streams
both answers (SSE: a `battle` event with the signed token, then `delta` events per side, `end`);
POST /api/battle/turn continues it with the same pair; POST /api/vote records one vote per battle and
only then answers with the contestants' names and fingerprints. Every POST needs the CSRF header.
There is no route that deletes anything.

Every request body is read with a bound (`body_limit`: refused from its Content-Length, or while it
streams, before it is all read) and parsed by herd.arena.untrusted, and every field is checked for its type
and range, so malformed input gets a 4xx that says what is wrong, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import re
from contextlib import aclosing, asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from herd.arena import tokens, untrusted
from herd.arena.config import ArenaConfig
from herd.arena.contestants import verification, weight_problem
from herd.arena.service import VOTES, Arena, RateLimiter, Turn

SESSION_COOKIE = "arena_session"
MAX_ID = 2**31 - 1  # the largest id either database stores (a 32-bit INTEGER on PostgreSQL)
MAX_NAME_CHARS = 200  # the contestants table's name and fingerprint columns


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def body_limit(config: ArenaConfig) -> int:
    """The largest request body the arena reads: a prompt at the length limit with every character written
    as a JSON escape (up to 12 bytes for one outside the BMP), and room for the other fields."""
    return 16 * 1024 + 12 * config.max_prompt_chars


class EventStream(StreamingResponse):
    """An SSE response that closes its events generator however the response ends, a client that left
    included, so a turn is stopped and saved at once rather than when the generator is collected."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _page(name: str) -> str:
    return resources.files("herd.arena").joinpath("static", name).read_text(encoding="utf-8")


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def create_arena_app(arena: Arena, config: ArenaConfig, spec_builder=None) -> FastAPI:
    """`spec_builder(dict) -> Contestant`: how an admin's new contestant is built (default: ContestantSpec)."""
    secret, salt = config.secret.encode(), config.salt.encode()
    battle_limit = RateLimiter(config.battles_per_minute)
    vote_limit = RateLimiter(config.votes_per_minute)
    blocked = {tokens.client_hash(salt, c) for c in config.blocked}
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(arena.close)

    app = FastAPI(title="herd arena", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.arena = arena

    limit = body_limit(config)

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        # past a 413 the rest of the body is never read, so the connection cannot carry another request
        return JSONResponse({"error": e.message}, status_code=e.status,
                            headers={"Connection": "close"} if e.status == 413 else None)

    async def json_body(request: Request) -> dict:
        """The request's JSON object, read within `limit` bytes: refused from Content-Length when it says
        more, else as soon as the streamed body passes the limit."""
        too_large = Refused(413, f"the request body is larger than this arena's limit of {limit:,} bytes")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            body = untrusted.loads(b"".join(chunks))
        except untrusted.UntrustedJSON as e:
            raise Refused(400, f"the request body: {e}") from None
        if not isinstance(body, dict):
            raise Refused(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def client_of(request: Request) -> str:
        if config.trust_forwarded_for and request.headers.get("x-forwarded-for"):
            return request.headers["x-forwarded-for"].split(",")[0].strip()
        return request.client.host if request.client else "unknown"

    async def guarded(request: Request, limiter: RateLimiter | None) -> tuple[dict, str]:
        """(JSON body, client hash) of a POST that passed the CSRF, block and rate checks."""
        if not tokens.csrf_ok(secret, request.cookies.get(SESSION_COOKIE), request.headers.get("x-csrf-token")):
            raise Refused(403, "missing or wrong CSRF token: reload the page")
        client = tokens.client_hash(salt, client_of(request))
        if client in blocked or await asyncio.to_thread(arena.store.blocked, client):
            raise Refused(403, "this client is blocked from the arena")
        if limiter is not None and not limiter.allow(client):
            raise Refused(429, f"too many requests: at most {limiter.limit} a minute; try again shortly")
        return await json_body(request), client

    def prompt_of(body: dict) -> str:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise Refused(400, "write a prompt first")
        if len(prompt) > config.max_prompt_chars:
            raise Refused(413, f"the prompt is {len(prompt)} characters; this arena takes at most "
                               f"{config.max_prompt_chars}")
        return prompt

    def uid_of(request: Request, body: dict) -> str:
        token = body.get("token", "")
        uid = tokens.battle_uid(secret, token, request.cookies.get(SESSION_COOKIE)) if isinstance(token, str) else None
        if uid is None or arena.store.battle(uid) is None:
            raise Refused(403, "this battle token was not issued by this arena to this browser session")
        return uid

    def with_session(request: Request, html: str) -> HTMLResponse:
        session = request.cookies.get(SESSION_COOKIE) or tokens.new_session()
        response = HTMLResponse(html.replace("{{CSRF}}", tokens.csrf_token(secret, session)))
        response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict")
        return response

    @app.get("/", response_class=HTMLResponse)
    async def battle_page(request: Request):
        return with_session(request, _page("battle.html"))

    @app.get("/leaderboard", response_class=HTMLResponse)
    async def leaderboard_page(request: Request):
        return with_session(request, _page("leaderboard.html"))

    async def stream_turn(turn: Turn, session: str | None):
        if session is not None:
            yield _event({"type": "battle", "token": tokens.battle_token(secret, turn.uid, session)})
        async with aclosing(turn.events()) as events:  # closing this stream stops the turn (saved, cut)
            async for side, text, error in events:
                if text is not None:
                    yield _event({"type": "delta", "side": side, "text": text})
                else:
                    yield _event({"type": "done", "side": side, **({"error": error} if error else {})})
        yield _event({"type": "end"})

    def sse(events) -> StreamingResponse:
        return EventStream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/battle")
    async def new_battle(request: Request):
        body, client = await guarded(request, battle_limit)
        prompt = prompt_of(body)
        try:
            uid = await asyncio.to_thread(arena.start, client)
        except LookupError as e:
            raise Refused(503, str(e)) from None
        return sse(stream_turn(arena.begin_turn(uid, prompt), request.cookies[SESSION_COOKIE]))

    @app.post("/api/battle/turn")
    async def next_turn(request: Request):
        body, client = await guarded(request, battle_limit)
        prompt = prompt_of(body)
        uid = uid_of(request, body)
        battle = arena.store.battle(uid)
        if sum(1 for m in battle["conversation_a"] if m["role"] == "user") >= config.max_turns:
            raise Refused(409, f"this battle has had its {config.max_turns} turns; vote, then start a new one")
        if not await asyncio.to_thread(arena.store.start_turn, uid):
            raise Refused(409, "this battle is over (voted) or still answering")
        return sse(stream_turn(arena.begin_turn(uid, prompt), None))

    @app.post("/api/vote")
    async def vote(request: Request):
        body, client = await guarded(request, vote_limit)
        uid = uid_of(request, body)
        if not isinstance(body.get("winner"), str) or body["winner"] not in VOTES:
            raise Refused(400, f"winner must be one of {', '.join(VOTES)}")
        if not await asyncio.to_thread(arena.vote, uid, body["winner"], client):
            raise Refused(409, "this battle has a vote already (or its answers are not finished)")
        return {"accepted": True, "winner": VOTES[body["winner"]], **arena.reveal(uid)}

    @app.get("/api/leaderboard")
    async def leaderboard(board: str = "human"):
        if board not in ("human", "judge"):
            raise Refused(404, "boards: human, judge")
        result = await asyncio.to_thread(arena.board, board)
        return {**result, "sampling": arena.sampling_table()}

    @app.get("/api/leaderboard.png")
    async def leaderboard_png(board: str = "human"):
        from herd.arena.plot import intervals_png

        if board not in ("human", "judge"):
            raise Refused(404, "boards: human, judge")
        result = await asyncio.to_thread(arena.board, board)
        png = await asyncio.to_thread(intervals_png, result)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/api/contestants")
    async def all_contestants():
        """Every contestant that ever entered, retired ones included: the public record."""
        rows = await asyncio.to_thread(arena.store.contestants)
        return {"contestants": [{**{k: r[k] for k in ("name", "fingerprint", "kind", "verified", "created_at",
                                                       "retired_at")},
                                 "verification": verification(r["kind"], r["fingerprint"], r["verified"])}
                                for r in rows]}

    @app.get("/api/battles.jsonl")
    async def export(board: str | None = None):
        if board not in (None, "human", "judge"):
            raise Refused(404, "boards: human, judge (or none for both)")
        records = await asyncio.to_thread(arena.store.records, board)
        return Response("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                        media_type="application/x-ndjson")

    # -- admin ---------------------------------------------------------------------------------------------
    def admin(request: Request) -> None:
        if not config.admin_key:
            raise Refused(403, "no admin key is configured for this arena")
        if request.headers.get("authorization", "") != f"Bearer {config.admin_key}":
            raise Refused(401, "admin key required (Authorization: Bearer KEY)")

    async def admin_body(request: Request) -> dict:
        admin(request)
        return await json_body(request)

    @app.post("/api/admin/contestants")
    async def add_contestant(request: Request):
        from herd.arena.contestants import ContestantSpec
        from herd.errors import HerdError

        body = await admin_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise Refused(400, f"name must be a non-empty string of at most {MAX_NAME_CHARS} characters")
        for key in ("model", "url", "api_key"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise Refused(400, f"cannot enter {name!r}: `{key}` must be a string")
        weight = body.get("weight", 1.0)
        problem = weight_problem(weight)
        if problem:
            raise Refused(400, f"cannot enter {name!r}: `weight` {problem}")
        try:
            spec = ContestantSpec(name, body.get("model"), body.get("url"), body.get("api_key"), float(weight))
            contestant = await asyncio.to_thread(spec_builder or spec.build, *([body] if spec_builder else []))
            cid = await asyncio.to_thread(arena.enter, contestant)
        except (HerdError, ValueError, OSError) as e:
            raise Refused(400, f"cannot enter {name!r}: {e}") from None
        return {"id": cid, "name": contestant.name, "fingerprint": contestant.fingerprint,
                "verified": contestant.verified}

    @app.post("/api/admin/contestants/{cid}/retire")
    async def retire(cid: str, request: Request):
        admin(request)
        if not re.fullmatch(r"[0-9]{1,10}", cid) or int(cid) > MAX_ID or \
                not await asyncio.to_thread(arena.retire, int(cid)):
            raise Refused(404, f"no active contestant {cid[:40]!r}")
        return {"retired": int(cid)}

    @app.post("/api/admin/block")
    async def block(request: Request):
        body = await admin_body(request)
        if not isinstance(body.get("client"), str) or not body["client"]:
            raise Refused(400, "client (an address) is required")
        if not isinstance(body.get("reason", ""), str):
            raise Refused(400, "reason must be a string")
        await asyncio.to_thread(arena.store.block, tokens.client_hash(salt, body["client"]), body.get("reason", ""))
        return {"blocked": True}

    return app
