"""The persistent embedded store: one SQLite file in WAL mode, for a single-host gateway.

Same contract as :class:`gateway.store_memory.EmbeddedStore` and the Redis store (one test suite
against all three), but a gateway killed with SIGKILL, or the machine losing power, comes back
with every namespace, route record and observation it acknowledged.

Durability policy (docs/reliability.md): every method is one SQLite transaction, committed
before it returns, so the gateway answers ``/v1/feedback`` only after the observation is
committed. With ``synchronous = "full"`` (the default) the commit also ``fsync``\\ s the WAL
file, so an acknowledged feedback survives a power loss or kernel crash; with ``"normal"`` it
survives the process being killed (the OS still holds the write) but the last commits before a
power loss may be lost. SQLite checkpoints the WAL into the main file on its own (every 1000
pages); a torn last write is rolled back on open, never half-applied.

All calls run in one worker thread on one connection (so the event loop never waits on a disk
``fsync``, and calls are applied in the order they were made); each write opens with
``BEGIN IMMEDIATE``, so even a second process on the same file could not interleave one.

>>> import asyncio, tempfile, numpy as np
>>> async def demo(path):
...     st = SqliteStore(path)
...     meta, _ = await st.create_namespace("run", {"policy": "bayesian"})
...     rid = (await st.put_routes("run", meta.gen, [(0, np.ones(2))], ttl_s=60))[0]
...     await st.apply_feedback([(rid, 0.5)])
...     await st.aclose()
...     again = SqliteStore(path)          # a restart: the observation is still there
...     _, log, _ = await again.read_tail("run", meta.gen, 0)
...     await again.aclose()
...     return [(o.seq, o.arm, o.reward) for o in log]
>>> asyncio.run(demo(tempfile.mkdtemp() + "/state.db"))
[(1, 0, 0.5)]
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from gateway.keys import APPLIED
from gateway.store import (
    FeedbackResult,
    NamespaceLimit,
    NamespaceMeta,
    Observation,
    Outcome,
    RouteId,
    StoreUnavailable,
    count_deltas,
    decode_entry,
    encode_record,
    encode_reward,
    new_gen,
    record_arm,
    route_uids,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
  name TEXT PRIMARY KEY, gen TEXT NOT NULL, config TEXT NOT NULL, created REAL NOT NULL,
  seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS log (
  ns TEXT NOT NULL, gen TEXT NOT NULL, seq INTEGER NOT NULL, entry BLOB NOT NULL,
  PRIMARY KEY (ns, gen, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS routes (
  ns TEXT NOT NULL, gen TEXT NOT NULL, uid TEXT NOT NULL, expires REAL NOT NULL,
  rec BLOB NOT NULL,
  PRIMARY KEY (ns, gen, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS routes_expires ON routes (expires);
CREATE TABLE IF NOT EXISTS route_counts (
  ns TEXT NOT NULL, gen TEXT NOT NULL, arm INTEGER NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (ns, gen, arm)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sticky (
  ns TEXT NOT NULL, gen TEXT NOT NULL, key TEXT NOT NULL, expires REAL NOT NULL,
  value BLOB NOT NULL,
  PRIMARY KEY (ns, gen, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
  ns TEXT NOT NULL, gen TEXT NOT NULL, seq INTEGER NOT NULL, blob BLOB NOT NULL,
  PRIMARY KEY (ns, gen)
) WITHOUT ROWID;
"""

# Expired route records are deleted every this many put_routes calls (as the in-memory store
# does), so the file stays bounded by the routes of one TTL.
_SWEEP_EVERY = 1024


def _meta(row: tuple[Any, ...]) -> NamespaceMeta:
    name, gen, config, created = row[:4]
    return NamespaceMeta(str(name), str(gen), json.loads(config), float(created))


class SqliteStore:
    """Store in one SQLite file; see the module docstring for the durability policy."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["full", "normal"] = "full",
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self._clock = clock
        self._puts = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rr-sqlite")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE.
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
            )
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"sqlite {self.path}: WAL mode refused (got {mode!r})")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"sqlite {self.path}: {exc}") from exc

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"sqlite {self.path}: {exc}") from exc

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one immediate transaction (committed, or rolled back on any error)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    async def ping(self) -> None:
        await self._run(lambda: self._db.execute("SELECT 1").fetchone())

    async def durability_warning(self) -> str | None:
        return None

    # ---- namespaces ----------------------------------------------------------------------

    def _get(self, db: sqlite3.Connection, ns: str) -> NamespaceMeta | None:
        row = db.execute(
            "SELECT name, gen, config, created FROM namespaces WHERE name = ?", (ns,)
        ).fetchone()
        return _meta(row) if row else None

    async def get_namespace(self, ns: str) -> NamespaceMeta | None:
        return await self._run(self._get, self._db, ns)

    async def create_namespace(
        self, ns: str, config: dict[str, Any], *, limit: int | None = None
    ) -> tuple[NamespaceMeta, bool]:
        def run(db: sqlite3.Connection) -> tuple[NamespaceMeta, bool]:
            got = self._get(db, ns)
            if got is not None:
                return got, False
            if limit is not None:
                (n,) = db.execute("SELECT COUNT(*) FROM namespaces").fetchone()
                if n >= limit:
                    raise NamespaceLimit(f"{n} namespaces exist (max_namespaces {limit})")
            row = (ns, new_gen(), json.dumps(config, sort_keys=True), self._clock())
            db.execute("INSERT INTO namespaces (name, gen, config, created) VALUES (?,?,?,?)", row)
            return _meta(row), True

        return await self._run(self._write, run)

    @staticmethod
    def _drop_gen(db: sqlite3.Connection, ns: str, gen: str) -> None:
        for table in ("log", "routes", "route_counts", "snapshots"):
            db.execute(f"DELETE FROM {table} WHERE ns = ? AND gen = ?", (ns, gen))

    async def reset_namespace(self, ns: str) -> NamespaceMeta | None:
        def run(db: sqlite3.Connection) -> NamespaceMeta | None:
            old = self._get(db, ns)
            if old is None:
                return None
            self._drop_gen(db, ns, old.gen)
            gen = new_gen()
            db.execute("UPDATE namespaces SET gen = ?, seq = 0 WHERE name = ?", (gen, ns))
            return NamespaceMeta(ns, gen, old.config, old.created)

        return await self._run(self._write, run)

    async def delete_namespace(self, ns: str) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            old = self._get(db, ns)
            if old is None:
                return False
            self._drop_gen(db, ns, old.gen)
            db.execute("DELETE FROM namespaces WHERE name = ?", (ns,))
            return True

        return await self._run(self._write, run)

    async def list_namespaces(self) -> list[str]:
        def run() -> list[str]:
            rows = self._db.execute("SELECT name FROM namespaces ORDER BY name").fetchall()
            return [str(r[0]) for r in rows]

        return await self._run(run)

    # ---- routes and feedback -------------------------------------------------------------

    async def put_routes(
        self,
        ns: str,
        gen: str,
        records: Sequence[tuple[int, np.ndarray]],
        ttl_s: float,
        *,
        uids: Sequence[str] | None = None,
        uncount: Sequence[int] = (),
    ) -> list[str]:
        given = route_uids(records, uids)
        counts = count_deltas(records, uncount)
        self._puts += 1
        sweep = self._puts % _SWEEP_EVERY == 0

        def run(db: sqlite3.Connection) -> None:
            now = self._clock()
            if sweep:
                db.execute("DELETE FROM routes WHERE expires <= ?", (now,))
            db.executemany(
                "INSERT OR REPLACE INTO routes (ns, gen, uid, expires, rec) VALUES (?,?,?,?,?)",
                [
                    (ns, gen, uid, now + ttl_s, encode_record(arm, h, uid))
                    for (arm, h), uid in zip(records, given, strict=True)
                ],
            )
            row = db.execute("SELECT gen FROM namespaces WHERE name = ?", (ns,)).fetchone()
            if row is None or row[0] != gen:
                return  # counts belong to the current generation only, as in the other stores
            db.executemany(
                "INSERT INTO route_counts (ns, gen, arm, n) VALUES (?,?,?,?) "
                "ON CONFLICT (ns, gen, arm) DO UPDATE SET n = n + excluded.n",
                [(ns, gen, arm, c) for arm, c in counts.items() if c],
            )

        await self._run(self._write, run)
        return [f"{ns}:{gen}:{uid}" for uid in given]

    async def apply_feedback(self, items: Sequence[tuple[str, float]]) -> list[FeedbackResult]:
        parsed = [(RouteId.parse(text), reward) for text, reward in items]

        def run(db: sqlite3.Connection) -> list[FeedbackResult]:
            now = self._clock()
            out = []
            seqs: dict[str, int] = {}
            for rid, reward in parsed:
                if rid is None:
                    out.append(FeedbackResult(Outcome.UNKNOWN))
                    continue
                ns_row = db.execute(
                    "SELECT gen, seq FROM namespaces WHERE name = ?", (rid.ns,)
                ).fetchone()
                rec = db.execute(
                    "SELECT expires, rec FROM routes WHERE ns = ? AND gen = ? AND uid = ?",
                    (rid.ns, rid.gen, rid.uid),
                ).fetchone()
                if ns_row is None or ns_row[0] != rid.gen or rec is None or rec[0] <= now:
                    out.append(FeedbackResult(Outcome.UNKNOWN))
                    continue
                body = bytes(rec[1])
                if body == APPLIED:
                    out.append(FeedbackResult(Outcome.DUPLICATE, rid.ns))
                    continue
                seq = seqs.get(rid.ns, int(ns_row[1])) + 1
                seqs[rid.ns] = seq
                db.execute(
                    "INSERT INTO log (ns, gen, seq, entry) VALUES (?,?,?,?)",
                    (rid.ns, rid.gen, seq, encode_reward(reward) + body),
                )
                db.execute(
                    "UPDATE routes SET rec = ? WHERE ns = ? AND gen = ? AND uid = ?",
                    (APPLIED, rid.ns, rid.gen, rid.uid),
                )
                db.execute("UPDATE namespaces SET seq = ? WHERE name = ?", (seq, rid.ns))
                arm = record_arm(body)
                out.append(FeedbackResult(Outcome.APPLIED, rid.ns, seq, arm))
            return out

        if all(rid is None for rid, _ in parsed):
            return [FeedbackResult(Outcome.UNKNOWN) for _ in parsed]
        return await self._run(self._write, run)

    async def read_tail(
        self, ns: str, gen: str, after_seq: int, limit: int | None = None
    ) -> tuple[NamespaceMeta | None, list[Observation], int]:
        def run(db: sqlite3.Connection) -> tuple[NamespaceMeta | None, list[Observation], int]:
            meta = self._get(db, ns)
            if meta is None or meta.gen != gen:
                return meta, [], 0
            (length,) = db.execute("SELECT seq FROM namespaces WHERE name = ?", (ns,)).fetchone()
            rows = db.execute(
                "SELECT seq, entry FROM log WHERE ns = ? AND gen = ? AND seq > ? ORDER BY seq "
                "LIMIT ?",
                (ns, gen, after_seq, -1 if limit is None else limit),
            ).fetchall()
            obs = [decode_entry(int(s), bytes(e), ns, gen) for s, e in rows]
            return meta, obs, int(length)

        # One read transaction, so the generation and the tail are read at the same instant.
        return await self._run(self._read, run)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        db.execute("BEGIN")
        try:
            return fn(db)
        finally:
            db.execute("COMMIT")

    async def route_counts(self, ns: str, gen: str) -> dict[int, int]:
        def run() -> dict[int, int]:
            rows = self._db.execute(
                "SELECT arm, n FROM route_counts WHERE ns = ? AND gen = ?", (ns, gen)
            ).fetchall()
            return {int(a): int(n) for a, n in rows}

        return await self._run(run)

    async def trim_log(self, ns: str, gen: str, upto: int) -> int:
        def run(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT gen, seq FROM namespaces WHERE name = ?", (ns,)).fetchone()
            if row is None or row[0] != gen:
                return 0
            length = int(row[1])
            db.execute(
                "DELETE FROM log WHERE ns = ? AND gen = ? AND seq <= ?",
                (ns, gen, min(upto, length)),
            )
            (base,) = db.execute(
                "SELECT COALESCE(MIN(seq) - 1, ?) FROM log WHERE ns = ? AND gen = ?",
                (length, ns, gen),
            ).fetchone()
            return int(base)

        return await self._run(self._write, run)

    async def get_snapshot(self, ns: str, gen: str) -> tuple[int, bytes] | None:
        def run() -> tuple[int, bytes] | None:
            row = self._db.execute(
                "SELECT seq, blob FROM snapshots WHERE ns = ? AND gen = ?", (ns, gen)
            ).fetchone()
            return (int(row[0]), bytes(row[1])) if row else None

        return await self._run(run)

    async def put_snapshot(
        self, ns: str, gen: str, seq: int, blob: bytes, *, last_uid: str | None = None
    ) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            row = self._get(db, ns)
            if row is None or row.gen != gen:
                return False
            if last_uid is not None:
                got = db.execute(
                    "SELECT entry FROM log WHERE ns = ? AND gen = ? AND seq = ?", (ns, gen, seq)
                ).fetchone()
                if got is None or not bytes(got[0]).endswith(last_uid.encode()):
                    return False
            cur = db.execute(
                "INSERT INTO snapshots (ns, gen, seq, blob) VALUES (?,?,?,?) "
                "ON CONFLICT (ns, gen) DO UPDATE SET seq = excluded.seq, blob = excluded.blob "
                "WHERE excluded.seq > snapshots.seq",
                (ns, gen, seq, blob),
            )
            return cur.rowcount > 0

        return await self._run(self._write, run)

    async def get_sticky(self, ns: str, gen: str, keys: Sequence[str]) -> dict[str, bytes]:
        def run() -> dict[str, bytes]:
            now = self._clock()
            out = {}
            for k in keys:
                row = self._db.execute(
                    "SELECT value FROM sticky WHERE ns = ? AND gen = ? AND key = ? AND expires > ?",
                    (ns, gen, k, now),
                ).fetchone()
                if row is not None:
                    out[k] = bytes(row[0])
            return out

        return await self._run(run)

    async def claim_sticky(self, ns: str, gen: str, key: str, value: bytes, ttl_s: float) -> bytes:
        def run(db: sqlite3.Connection) -> bytes:
            now = self._clock()
            db.execute(
                "DELETE FROM sticky WHERE ns = ? AND gen = ? AND key = ? AND expires <= ?",
                (ns, gen, key, now),
            )
            db.execute(
                "INSERT OR IGNORE INTO sticky (ns, gen, key, expires, value) VALUES (?,?,?,?,?)",
                (ns, gen, key, now + ttl_s, value),
            )
            row = db.execute(
                "SELECT value FROM sticky WHERE ns = ? AND gen = ? AND key = ?", (ns, gen, key)
            ).fetchone()
            return bytes(row[0])

        return await self._run(self._write, run)

    async def aclose(self) -> None:
        def run() -> None:
            self._db.close()

        try:
            await self._run(run)
        finally:
            self._pool.shutdown(wait=True)
