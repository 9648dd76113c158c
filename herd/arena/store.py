"""The arena's record in a real database (SQLAlchemy Core): SQLite by default, PostgreSQL for a deployment.

Nothing here deletes: a contestant is retired by a mark, a battle once voted keeps its vote. A vote is one
UPDATE guarded by `winner IS NULL`, so two requests racing to vote on one battle cannot both win, on
either database. Schema changes are ordered steps recorded in `schema_version`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from herd.errors import HerdError

metadata = sa.MetaData()

schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))

contestants = sa.Table(
    "contestants", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    # herd's weight fingerprint; for an endpoint that cannot report one, "unverified:" + a hash of where it is
    sa.Column("fingerprint", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),  # local | endpoint | imported
    sa.Column("verified", sa.Boolean, nullable=False),
    sa.Column("source", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("retired_at", sa.Float, nullable=True),
    sa.UniqueConstraint("name", "fingerprint", name="one_row_per_variant"),
)

battles = sa.Table(
    "battles", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("uid", sa.String(64), nullable=False, unique=True),
    sa.Column("board", sa.String(10), nullable=False),  # human | judge
    sa.Column("contestant_a", sa.Integer, sa.ForeignKey("contestants.id"), nullable=False),
    sa.Column("contestant_b", sa.Integer, sa.ForeignKey("contestants.id"), nullable=False),
    sa.Column("conversation_a", sa.Text, nullable=False, default="[]"),  # JSON messages
    sa.Column("conversation_b", sa.Text, nullable=False, default="[]"),
    sa.Column("tokens_a", sa.Integer, nullable=False, default=0),  # answer tokens generated, all turns
    sa.Column("tokens_b", sa.Integer, nullable=False, default=0),
    sa.Column("sampling", sa.Text, nullable=False, default="{}"),  # JSON
    sa.Column("answered", sa.Boolean, nullable=False, default=False),  # both answers of the last turn done
    sa.Column("winner", sa.String(20), nullable=True),
    sa.Column("voter", sa.String(100), nullable=True),  # salted hash of the voter, or the judge's name
    sa.Column("client", sa.String(100), nullable=False, default=""),  # salted hash of who started it
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("voted_at", sa.Float, nullable=True),
)

blocked_clients = sa.Table(
    "blocked_clients", metadata,
    sa.Column("client", sa.String(100), primary_key=True),  # salted hash
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
)


def _v1(conn):
    metadata.create_all(conn, tables=[contestants, battles])


def _v2(conn):
    metadata.create_all(conn, tables=[blocked_clients])


def _v3(conn):
    # Only weights herd loaded and hashed itself are verified. Before this step an endpoint whose model card
    # claimed a fingerprint was stored as verified, and so was whatever an imported log said.
    conn.execute(contestants.update().where(contestants.c.kind != "local").values(verified=False))


MIGRATIONS = [_v1, _v2, _v3]  # step i brings the schema to version i + 1; append, never edit


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA busy_timeout=30000")  # writers wait their turn instead of failing
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def database_url(db: str | None, default_path: str | Path = "arena.db") -> str:
    if not db:
        return f"sqlite:///{Path(default_path).resolve()}"
    if "://" not in db:  # a path
        return f"sqlite:///{Path(db).resolve()}"
    if db.startswith("postgresql://"):
        return "postgresql+psycopg://" + db[len("postgresql://"):]
    return db


def _content_id(record: dict, seen: dict[str, int]) -> str:
    """A battle id for a record that has none: a hash of its content and of how many identical records came
    before it in the log (two equal lines are two battles; importing the log again finds both)."""
    content = json.dumps(record, sort_keys=True, ensure_ascii=True)
    occurrence = seen.get(content, 0)
    seen[content] = occurrence + 1
    return "log-" + hashlib.sha256(f"{occurrence}\0{content}".encode()).hexdigest()[:40]


class Store:
    def __init__(self, url: str, *, migrate: bool = True):
        self.url = database_url(url)
        kwargs = {}
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            path = self.url.partition(":///")[2]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = sa.create_engine(self.url, **kwargs)
        except (ImportError, sa.exc.ArgumentError) as e:
            raise HerdError(f"arena database {url!r}: {e}") from None
        if self.url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        if migrate:
            self.migrate()

    # -- schema ----------------------------------------------------------------------------------------
    def version(self) -> int:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("schema_version"):
                return 0
            return conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0

    def migrate(self, target: int | None = None) -> int:
        target = len(MIGRATIONS) if target is None else target
        with self.engine.begin() as conn:
            metadata.create_all(conn, tables=[schema_version])
        current = self.version()
        for step in range(current, target):
            with self.engine.begin() as conn:  # each step and its version row commit together
                MIGRATIONS[step](conn)
                conn.execute(schema_version.insert().values(version=step + 1))
        return max(current, target)

    # -- contestants -----------------------------------------------------------------------------------
    def add_contestant(self, name: str, fingerprint: str, kind: str, verified: bool, source: str = "") -> int:
        """The id of (name, fingerprint), created if new; a retired variant entered again is active again."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(contestants.c.id).where(
                contestants.c.name == name, contestants.c.fingerprint == fingerprint)).first()
            if row is not None:
                conn.execute(contestants.update().where(contestants.c.id == row.id).values(retired_at=None))
                return row.id
            try:
                return conn.execute(contestants.insert().values(
                    name=name, fingerprint=fingerprint, kind=kind, verified=verified, source=source,
                    created_at=time.time())).inserted_primary_key[0]
            except sa.exc.IntegrityError:  # another process entered it first
                pass
        return self.add_contestant(name, fingerprint, kind, verified, source)

    def retire(self, contestant_id: int) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(contestants.update().where(contestants.c.id == contestant_id,
                                                           contestants.c.retired_at.is_(None))
                                .values(retired_at=time.time()))
            return done.rowcount == 1

    def contestants(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(contestants).order_by(contestants.c.id))]

    # -- battles ---------------------------------------------------------------------------------------
    def create_battle(self, board: str, a: int, b: int, sampling: dict, client: str, uid: str | None = None) -> str:
        uid = uid or uuid.uuid4().hex
        with self.engine.begin() as conn:
            conn.execute(battles.insert().values(uid=uid, board=board, contestant_a=a, contestant_b=b,
                                                 sampling=json.dumps(sampling), client=client,
                                                 created_at=time.time()))
        return uid

    def battle(self, uid: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(battles).where(battles.c.uid == uid)).first()
        if row is None:
            return None
        out = dict(row._mapping)
        out["conversation_a"] = json.loads(out["conversation_a"])
        out["conversation_b"] = json.loads(out["conversation_b"])
        out["sampling"] = json.loads(out["sampling"])
        return out

    def start_turn(self, uid: str) -> bool:
        """Mark a turn as being answered; False if the battle is voted (it is over) or mid-turn."""
        with self.engine.begin() as conn:
            done = conn.execute(battles.update().where(battles.c.uid == uid, battles.c.winner.is_(None),
                                                       battles.c.answered.is_(True)).values(answered=False))
            return done.rowcount == 1

    def save_answers(self, uid: str, conversation_a: list, conversation_b: list, tokens_a: int, tokens_b: int):
        with self.engine.begin() as conn:
            conn.execute(battles.update().where(battles.c.uid == uid).values(
                conversation_a=json.dumps(conversation_a, ensure_ascii=False),
                conversation_b=json.dumps(conversation_b, ensure_ascii=False),
                tokens_a=tokens_a, tokens_b=tokens_b, answered=True))

    def vote(self, uid: str, winner: str, voter: str) -> bool:
        """Record the vote; False when the battle has one already or its answers are not all in."""
        with self.engine.begin() as conn:
            done = conn.execute(battles.update().where(
                battles.c.uid == uid, battles.c.winner.is_(None), battles.c.answered.is_(True))
                .values(winner=winner, voter=voter, voted_at=time.time()))
            return done.rowcount == 1

    def count_votes(self, board: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(battles).where(battles.c.winner.is_not(None))
        if board:
            q = q.where(battles.c.board == board)
        with self.engine.connect() as conn:
            return conn.execute(q).scalar()

    def records(self, board: str | None = None) -> list[dict]:
        """Every voted battle in FastChat's clean_battle shape (herd.arena.battlelog), oldest first."""
        from herd.arena.style import conv_metadata

        a, b = contestants.alias("a"), contestants.alias("b")
        q = (sa.select(battles, a.c.name.label("name_a"), a.c.fingerprint.label("fp_a"),
                       a.c.verified.label("verified_a"), b.c.name.label("name_b"), b.c.fingerprint.label("fp_b"),
                       b.c.verified.label("verified_b"))
             .join(a, battles.c.contestant_a == a.c.id).join(b, battles.c.contestant_b == b.c.id)
             .where(battles.c.winner.is_not(None)).order_by(battles.c.voted_at, battles.c.id))
        if board:
            q = q.where(battles.c.board == board)
        with self.engine.connect() as conn:
            rows = [r._mapping for r in conn.execute(q)]
        out = []
        for r in rows:
            conv_a, conv_b = json.loads(r["conversation_a"]), json.loads(r["conversation_b"])
            out.append({
                "question_id": r["uid"], "model_a": r["name_a"], "model_b": r["name_b"], "winner": r["winner"],
                "judge": r["voter"], "conversation_a": conv_a, "conversation_b": conv_b,
                "turn": sum(1 for m in conv_a if m["role"] == "user"), "anony": True, "language": "unknown",
                "tstamp": r["voted_at"], "tstamp_start": r["created_at"],
                "conv_metadata": conv_metadata(conv_a, conv_b, r["tokens_a"] or None, r["tokens_b"] or None),
                "fingerprint_a": r["fp_a"], "fingerprint_b": r["fp_b"],
                "verified_a": bool(r["verified_a"]), "verified_b": bool(r["verified_b"]),
                "sampling": json.loads(r["sampling"]), "board": r["board"],
            })
        return out

    def import_records(self, records: list[dict]) -> int:
        """Add battles from a clean_battle log (already checked by herd.arena.battlelog); a battle id
        already present is skipped, so importing a log twice adds nothing. A record without `question_id`
        gets an id from its content (and, for identical records, which occurrence it is), so that holds for
        such logs too. Imported contestants are never verified here: this arena did not load their weights,
        whatever the log says. Returns battles added."""
        added = 0
        seen: dict[str, int] = {}
        for r in records:
            ids = []
            for side in "ab":
                fp = r.get(f"fingerprint_{side}") or f"unrecorded:{r[f'model_{side}']}"
                ids.append(self.add_contestant(r[f"model_{side}"], fp, "imported", False))
            uid = str(r.get("question_id") or "") or _content_id(r, seen)
            conv_a, conv_b = r.get("conversation_a") or [], r.get("conversation_b") or []
            meta = r.get("conv_metadata") or {}
            values = dict(uid=uid, board=r.get("board", "human"), contestant_a=ids[0], contestant_b=ids[1],
                          conversation_a=json.dumps(conv_a, ensure_ascii=False),
                          conversation_b=json.dumps(conv_b, ensure_ascii=False),
                          tokens_a=int(meta.get("sum_assistant_a_tokens") or 0),
                          tokens_b=int(meta.get("sum_assistant_b_tokens") or 0),
                          sampling=json.dumps(r.get("sampling") or {}), answered=True, winner=r["winner"],
                          voter=str(r.get("judge") or ""), client="", created_at=float(r.get("tstamp_start") or
                                                                                       r.get("tstamp") or 0),
                          voted_at=float(r.get("tstamp") or 0))
            with self.engine.begin() as conn:
                if conn.execute(sa.select(battles.c.id).where(battles.c.uid == uid)).first() is None:
                    conn.execute(battles.insert().values(**values))
                    added += 1
        return added

    # -- blocked clients -------------------------------------------------------------------------------
    def block(self, client: str, reason: str = "") -> None:
        with self.engine.begin() as conn:
            if conn.execute(sa.select(blocked_clients.c.client).where(blocked_clients.c.client == client)).first():
                return
            conn.execute(blocked_clients.insert().values(client=client, reason=reason, created_at=time.time()))

    def blocked(self, client: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(blocked_clients.c.client)
                                .where(blocked_clients.c.client == client)).first() is not None

    def close(self) -> None:
        self.engine.dispose()
