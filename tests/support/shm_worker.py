"""A worker process for the shared-memory tests: hammers keys of one store and
records every admission (one line, written unbuffered, after the decision).

    python shm_worker.py <store name> <rate> <keys> <calls> <record file> [--forever]
"""

from __future__ import annotations

import os
import sys

import nexus_limits as nl


def main() -> None:
    name, rate, keys, calls, record = sys.argv[1:6]
    forever = "--forever" in sys.argv
    limiter = nl.TokenBucket(rate, store=nl.SharedMemoryStore(name, ttl=86400))
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    n_keys, n_calls = int(keys), int(calls)
    i = 0
    while forever or i < n_calls:
        key = f"key-{i % n_keys}"
        if limiter.try_acquire(key):
            os.write(fd, f"{key}\n".encode())
        i += 1
    os.close(fd)


if __name__ == "__main__":
    main()
