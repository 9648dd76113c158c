"""The arena's web app: a battle page, a leaderboard page, and the JSON/SSE API they use (FastAPI).

Flow: GET / sets a session cookie and embeds its CSRF token; POST /api/battle draws a pair and streams
both answers (SSE: a `battle` event with the signed token, then `delta` events per side, `end`);
POST /api/battle/turn continues it with the same pair; POST /api/vote records one vote per battle and
only then answers with the contestants' names and fingerprints. Every POST needs the CSRF header.
There is no route that deletes anything.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from herd.arena import tokens
from herd.arena.config import ArenaConfig
from herd.arena.service import VOTES, Arena, RateLimiter

SESSION_COOKIE = "arena_session"


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


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

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return JSONResponse({"error": e.message}, status_code=e.status)

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
        try:
            body = await request.json()
        except ValueError:
            raise Refused(400, "the request body must be JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "the request body must be a JSON object")
        return body, client

    def prompt_of(body: dict) -> str:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise Refused(400, "write a prompt first")
        if len(prompt) > config.max_prompt_chars:
            raise Refused(413, f"the prompt is {len(prompt)} characters; this arena takes at most "
                               f"{config.max_prompt_chars}")
        return prompt

    def uid_of(request: Request, body: dict) -> str:
        uid = tokens.battle_uid(secret, body.get("token", ""), request.cookies.get(SESSION_COOKIE))
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

    async def stream_turn(uid: str, prompt: str, session: str | None):
        if session is not None:
            yield _event({"type": "battle", "token": tokens.battle_token(secret, uid, session)})
        async for side, text, error in arena.turn(uid, prompt):
            if text is not None:
                yield _event({"type": "delta", "side": side, "text": text})
            else:
                yield _event({"type": "done", "side": side, **({"error": error} if error else {})})
        yield _event({"type": "end"})

    def sse(events) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/battle")
    async def new_battle(request: Request):
        body, client = await guarded(request, battle_limit)
        prompt = prompt_of(body)
        try:
            uid = await asyncio.to_thread(arena.start, client)
        except LookupError as e:
            raise Refused(503, str(e)) from None
        return sse(stream_turn(uid, prompt, request.cookies[SESSION_COOKIE]))

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
        return sse(stream_turn(uid, prompt, None))

    @app.post("/api/vote")
    async def vote(request: Request):
        body, client = await guarded(request, vote_limit)
        uid = uid_of(request, body)
        if body.get("winner") not in VOTES:
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
        return {"contestants": [{k: r[k] for k in ("name", "fingerprint", "kind", "verified", "created_at",
                                                    "retired_at")} for r in rows]}

    @app.get("/api/battles.jsonl")
    async def export(board: str | None = None):
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
        try:
            body = await request.json()
        except ValueError:
            raise Refused(400, "the request body must be JSON") from None
        return body if isinstance(body, dict) else {}

    @app.post("/api/admin/contestants")
    async def add_contestant(request: Request):
        from herd.arena.contestants import ContestantSpec
        from herd.errors import HerdError

        body = await admin_body(request)
        if not isinstance(body.get("name"), str) or not body["name"].strip():
            raise Refused(400, "name is required")
        try:
            weight = float(body.get("weight", 1.0))
            if weight <= 0:
                raise ValueError
            spec = ContestantSpec(body["name"], body.get("model"), body.get("url"), body.get("api_key"), weight)
            contestant = await asyncio.to_thread(spec_builder or spec.build, *([body] if spec_builder else []))
        except (HerdError, ValueError, OSError) as e:
            raise Refused(400, f"cannot enter {body['name']!r}: {e or 'weight must be a number > 0'}") from None
        cid = await asyncio.to_thread(arena.enter, contestant)
        return {"id": cid, "name": contestant.name, "fingerprint": contestant.fingerprint,
                "verified": contestant.verified}

    @app.post("/api/admin/contestants/{cid}/retire")
    async def retire(cid: int, request: Request):
        admin(request)
        if not await asyncio.to_thread(arena.retire, cid):
            raise Refused(404, f"no active contestant {cid}")
        return {"retired": cid}

    @app.post("/api/admin/block")
    async def block(request: Request):
        body = await admin_body(request)
        if not isinstance(body.get("client"), str):
            raise Refused(400, "client (an address) is required")
        await asyncio.to_thread(arena.store.block, tokens.client_hash(salt, body["client"]), body.get("reason", ""))
        return {"blocked": True}

    return app
