"""``python -m bench.claimloop MODE``: the bare claim-and-update loop smsgate's dispatcher is measured against.

It works on ``bench_baseline_queue`` (shaped like ``messages``: id, phone, text, status, due_at with the same
partial index, claim_token) and exits once nothing is due.  The database is ``BENCH_DSN`` (from the environment,
so that a password in it never shows in the process list).  Two modes:

- ``batch``: one statement per batch of 32 claims the due rows (``FOR UPDATE SKIP LOCKED``) and marks them
  sent at once: the least work a queue of PostgreSQL rows can be drained with;
- ``finish``: claims a batch under a lease and a claim token, then finishes every row with an UPDATE of its own
  that checks the token (concurrently, on a pool): the smallest loop that, like smsgate, records each message's
  outcome separately and rejects stale writes.  No attempt rows, no provider call, no logging.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

import aiopg

QUEUE_DDL = """
CREATE TABLE IF NOT EXISTS bench_baseline_queue (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    phone       text        NOT NULL,
    text        text        NOT NULL,
    status      text        NOT NULL DEFAULT 'queued',
    due_at      timestamptz          DEFAULT now(),
    claim_token uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS bench_baseline_queue_due_idx ON bench_baseline_queue (due_at) WHERE due_at IS NOT NULL;
"""
BATCH = 32
DUE = ("WITH due AS (SELECT id FROM bench_baseline_queue WHERE due_at <= now() ORDER BY due_at LIMIT %(batch)s "
       "FOR UPDATE SKIP LOCKED) ")
CLAIM_AND_SEND = (DUE + "UPDATE bench_baseline_queue q SET status = 'sent', due_at = NULL, updated_at = now() "
                  "FROM due WHERE q.id = due.id RETURNING q.id")
CLAIM = (DUE + "UPDATE bench_baseline_queue q SET status = 'sending', claim_token = %(token)s, "
         "due_at = now() + interval '30 seconds', updated_at = now() FROM due WHERE q.id = due.id RETURNING q.id")
FINISH = ("UPDATE bench_baseline_queue SET status = 'sent', due_at = NULL, claim_token = NULL, updated_at = now() "
          "WHERE id = %s AND claim_token = %s")
LEFT = "SELECT count(*) FROM bench_baseline_queue WHERE due_at IS NOT NULL"


async def finish_one(pool: aiopg.Pool, message_id: uuid.UUID, token: uuid.UUID) -> None:
    """Mark one claimed row sent, if the claim still holds."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(FINISH, (message_id, token))


async def drain(dsn: str, mode: str, max_seconds: float) -> int:
    """Work until nothing is due (or ``max_seconds``); returns how many rows this process finished."""
    done = 0
    deadline = time.monotonic() + max_seconds
    async with aiopg.create_pool(dsn, minsize=1, maxsize=BATCH // 2 + 2) as pool:
        while time.monotonic() < deadline:
            token = uuid.uuid4()
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(CLAIM_AND_SEND if mode == "batch" else CLAIM, {"batch": BATCH, "token": token})
                ids = [row[0] for row in await cur.fetchall()]
            if mode == "finish" and ids:
                await asyncio.gather(*(finish_one(pool, message_id, token) for message_id in ids))
            done += len(ids)
            if not ids:
                async with pool.acquire() as conn, conn.cursor() as cur:
                    await cur.execute(LEFT)
                    (left,) = await cur.fetchone()
                if left == 0:
                    break
                await asyncio.sleep(0.005)  # rows are due but held by another replica
    return done


def main(argv: list[str]) -> int:
    """Entry point: ``MODE [MAX_SECONDS]``, with the database in ``BENCH_DSN``."""
    if len(argv) not in (1, 2) or argv[0] not in ("batch", "finish"):
        print("usage: BENCH_DSN=... python -m bench.claimloop batch|finish [MAX_SECONDS]", file=sys.stderr)
        return 2
    done = asyncio.run(drain(os.environ["BENCH_DSN"], argv[0], float(argv[1]) if len(argv) == 2 else 300.0))
    print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
