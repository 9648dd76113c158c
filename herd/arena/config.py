"""arena.toml: the arena's settings and its contestants.

    [arena]
    db = "arena.db"                 # or postgresql://user@host/db
    secret = "..."                  # signs battle and CSRF tokens (default: $HERD_ARENA_SECRET, else random
                                    # per start, which voids open battles on restart)
    salt = "..."                    # salts voter hashes (default: the secret)
    admin_key = "..."               # Authorization: Bearer KEY for /api/admin/* (default: $HERD_ARENA_ADMIN_KEY)
    max_prompt_chars = 4000
    max_tokens = 256                # per answer, per turn
    max_turns = 8
    context = 2048                  # tokens per conversation, local contestants
    max_batch = 4                   # sequences each local contestant's engine batches
    provisional_votes = 30
    bootstrap_rounds = 200
    battles_per_minute = 10         # per client
    votes_per_minute = 20
    blocked = ["203.0.113.7"]
    trust_forwarded_for = false     # take the client from X-Forwarded-For (behind a proxy you run)

    [arena.sampling]                # the same for both answers, stored with each battle
    temperature = 0.7
    top_p = 0.9

    [[contestant]]
    name = "smollm2"
    model = "smollm2-135m"          # a herd source: file, directory or alias
    weight = 1.0                    # sampling weight (shown on the leaderboard page)

    [[contestant]]
    name = "other"
    url = "http://127.0.0.1:8001/v1"
    model = "other"                 # the endpoint's model id
    api_key_env = "OTHER_KEY"
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path

from herd.arena.contestants import ContestantSpec, weight_problem
from herd.errors import ConfigError

SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"}


@dataclass
class ArenaConfig:
    db: str | None = None
    secret: str = ""
    salt: str = ""
    admin_key: str | None = None
    max_prompt_chars: int = 4000
    max_tokens: int = 256
    max_turns: int = 8
    context: int = 2048  # tokens per conversation for local contestants (their KV cache is sized by it)
    max_batch: int = 4  # sequences each local contestant's engine runs together
    provisional_votes: int = 30
    bootstrap_rounds: int = 200
    battles_per_minute: int = 10
    votes_per_minute: int = 20
    blocked: list[str] = field(default_factory=list)
    trust_forwarded_for: bool = False
    sampling: dict = field(default_factory=lambda: {"temperature": 0.7, "top_p": 0.9})
    contestants: list[ContestantSpec] = field(default_factory=list)

    secret_is_random: bool = field(default=False, init=False)  # no secret given: tokens die with the process

    def __post_init__(self):
        self.secret = self.secret or os.environ.get("HERD_ARENA_SECRET") or ""
        if not self.secret:
            self.secret, self.secret_is_random = secrets.token_hex(32), True
        self.salt = self.salt or self.secret
        self.admin_key = self.admin_key or os.environ.get("HERD_ARENA_ADMIN_KEY")


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading arena.toml needs Python 3.11 or the `tomli` package") from None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_config(path: str | Path) -> ArenaConfig:
    path = Path(path)
    data = _toml(path)
    unknown = set(data) - {"arena", "contestant"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}; expected [arena] and [[contestant]]")
    arena = dict(data.get("arena", {}))
    known = {f.name for f in fields(ArenaConfig) if f.init} - {"contestants"}
    bad = set(arena) - known
    if bad:
        raise ConfigError(f"{path}: [arena] has unknown key(s) {sorted(bad)}; known: {sorted(known)}")
    sampling = arena.pop("sampling", {"temperature": 0.7, "top_p": 0.9})
    if set(sampling) - SAMPLING_KEYS:
        raise ConfigError(f"{path}: [arena.sampling] has unknown key(s) {sorted(set(sampling) - SAMPLING_KEYS)}")
    for key in ("max_prompt_chars", "max_tokens", "max_turns", "context", "max_batch", "bootstrap_rounds", "battles_per_minute",
                "votes_per_minute"):
        if key in arena and (not isinstance(arena[key], int) or arena[key] < 1):
            raise ConfigError(f"{path}: [arena] {key} must be a whole number >= 1, got {arena[key]!r}")
    specs = []
    for i, c in enumerate(data.get("contestant", []), 1):
        where = f"{path}: [[contestant]] #{i}"
        if not isinstance(c.get("name"), str) or not c["name"].strip():
            raise ConfigError(f"{where}: `name` is required")
        extra = set(c) - {"name", "model", "url", "api_key_env", "weight", "device", "dtype", "threads"}
        if extra:
            raise ConfigError(f"{where} ({c['name']}): unknown key(s) {sorted(extra)}")
        weight = c.get("weight", 1.0)
        problem = weight_problem(weight)  # TOML writes inf and nan too
        if problem:
            raise ConfigError(f"{where} ({c['name']}): `weight` {problem}")
        if bool(c.get("model")) == bool(c.get("url")) and not (c.get("url") and c.get("model")):
            raise ConfigError(f"{where} ({c['name']}): give `model` (a herd source) or `url` and `model`")
        model = c.get("model")
        if model and not c.get("url") and not Path(model).is_absolute() and (path.parent / model).exists():
            model = str(path.parent / model)  # relative to the config file
        specs.append(ContestantSpec(c["name"], model, c.get("url"),
                                    os.environ.get(c["api_key_env"]) if c.get("api_key_env") else None,
                                    float(weight), {k: c[k] for k in ("device", "dtype", "threads") if k in c}))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two [[contestant]] entries share a name; a new variant of a name is entered "
                          "by changing its weights, and shows up as such")
    if arena.get("db") and "://" not in arena["db"] and not Path(arena["db"]).is_absolute():
        arena["db"] = str(path.parent / arena["db"])
    return ArenaConfig(**arena, sampling=sampling, contestants=specs)
