"""Every Redis key the gateway uses, in one place, under one prefix.

A namespace's keys share the hash tag ``{ns}``, so on Redis Cluster they live in one slot and the
feedback script (which touches a namespace's meta, one route record and its log) stays legal.
``{p}:namespaces`` is a slot of its own: no script or transaction takes it together with a
namespace's keys (gateway/store_redis.py writes it in a step of its own). These names are the
ones of the first version: an existing Redis reads as it is, with or without a cluster.

``gen`` is a random token drawn when a namespace is created or reset: keys of an old generation
are never read again (route records of it answer "unknown" and expire on their TTL), so a reset
needs no scan over the keyspace.

    {p}:namespaces                      SET   names of the existing namespaces
    {p}:ns:{ns}:meta                    HASH  gen, config (JSON), created (unix s)
    {p}:ns:{ns}:g:{gen}:log             LIST  observations, append-only; base + index + 1 = seq no.
    {p}:ns:{ns}:g:{gen}:base            STR   entries trimmed off the log's head (compaction)
    {p}:ns:{ns}:g:{gen}:routes          HASH  rm index -> routes taken
    {p}:ns:{ns}:g:{gen}:r:{uuid}        STR   route record, TTL route_ttl_s; "A" once applied
    {p}:ns:{ns}:g:{gen}:r:{uuid}audit   STR   a gold audit's record (gateway/audits.py), the same
    {p}:ns:{ns}:g:{gen}:snap            HASH  seq, blob: a replica's folded state at seq
    {p}:ns:{ns}:g:{gen}:s:{sha256}      STR   a prompt's sticky route (OpenRLHF), TTL route_ttl_s

>>> k = Keys("rr")
>>> k.log("run-1", "9f3a")
'rr:ns:{run-1}:g:9f3a:log'
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

APPLIED = b"A"
"""What a route record becomes once its feedback is applied (kept until its TTL ends)."""


@dataclass(frozen=True)
class Keys:
    """Key builder for one prefix."""

    prefix: str

    def namespaces(self) -> str:
        return f"{self.prefix}:namespaces"

    def meta(self, ns: str) -> str:
        return f"{self.prefix}:ns:{{{ns}}}:meta"

    def log(self, ns: str, gen: str) -> str:
        return f"{self.prefix}:ns:{{{ns}}}:g:{gen}:log"

    def base(self, ns: str, gen: str) -> str:
        return f"{self.prefix}:ns:{{{ns}}}:g:{gen}:base"

    def routes(self, ns: str, gen: str) -> str:
        return f"{self.prefix}:ns:{{{ns}}}:g:{gen}:routes"

    def snapshot(self, ns: str, gen: str) -> str:
        return f"{self.prefix}:ns:{{{ns}}}:g:{gen}:snap"

    def route(self, ns: str, gen: str, uid: str) -> str:
        return f"{self.prefix}:ns:{{{ns}}}:g:{gen}:r:{uid}"

    def sticky(self, ns: str, gen: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]  # any prompt, a bounded key
        return f"{self.prefix}:ns:{{{ns}}}:g:{gen}:s:{digest}"
