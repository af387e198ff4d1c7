"""The overload bench's clients behave as documented: what its goodput and refusal figures rest on.

A polite client honours ``Retry-After`` and otherwise backs off exponentially with full jitter; an impatient one
waits a fixed 20 ms whatever the server says. Checked against a small HTTP server in the test that refuses the
first requests and records when each arrived.
"""

import asyncio
import os
import random
import time

import pytest
import uvloop

from bench.closedloop import BASE_BACKOFF_S, IMPATIENT, MAX_BACKOFF_S, POLITE, Client, Tally


def test_full_jitter_doubles_its_bound_up_to_the_cap_and_retry_after_wins():
    rng = random.Random(1)
    for n in range(1, 12):
        bound = min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** (n - 1))
        waits = [POLITE.wait(None, n, rng) for _ in range(2000)]
        assert 0 <= min(waits) and max(waits) <= bound
        assert max(waits) > 0.9 * bound  # uniform over the whole range, not a fixed step
    assert POLITE.wait(2.0, 5, rng) == 2.0
    assert IMPATIENT.wait(2.0, 5, rng) == BASE_BACKOFF_S
    assert IMPATIENT.wait(None, 9, rng) == BASE_BACKOFF_S


class RefusingServer:
    """Answers the first ``refusals`` requests with 503 (and ``retry_after`` when given), then 200."""

    def __init__(self, refusals: int, retry_after: str | None) -> None:
        self.refusals, self.retry_after = refusals, retry_after
        self.arrivals: list[float] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            self.arrivals.append(time.perf_counter())
            if len(self.arrivals) <= self.refusals:
                extra = f"Retry-After: {self.retry_after}\r\n" if self.retry_after else ""
                writer.write(f"HTTP/1.1 503 Service Unavailable\r\n{extra}Content-Length: 2\r\n\r\n{{}}".encode())
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()


async def one_client(policy, refusals: int, retry_after: str | None, seconds: float) -> tuple[list[float], Tally]:
    server = RefusingServer(refusals, retry_after)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    tally = Tally()
    done = loop.create_future()
    request = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
    _, client = await loop.create_connection(lambda: Client(request, policy, tally, done, random.Random(0)),
                                             "127.0.0.1", port)
    await client.warm  # the first answer is not counted, as in the bench
    client.until = time.perf_counter() + seconds
    client.send()
    await done
    listener.close()
    return server.arrivals, tally


@pytest.mark.parametrize("policy", [POLITE, IMPATIENT], ids=["polite", "impatient"])
def test_a_client_waits_what_retry_after_says_only_if_it_is_polite(policy):
    arrivals, tally = uvloop.run(one_client(policy, refusals=2, retry_after="1", seconds=1.6))
    gap = arrivals[2] - arrivals[1]  # after the counted refusal (the warm-up took the first answer)
    if policy is POLITE:
        assert 0.95 <= gap <= 1.3
        assert tally.retry_after[0] == 1.0
    else:
        assert gap < 0.2
    assert tally.errors == 0 and len(tally.refused) == 1 and tally.accepted


def test_without_retry_after_a_polite_client_backs_off_with_growing_jittered_waits():
    arrivals, tally = uvloop.run(one_client(POLITE, refusals=7, retry_after=None, seconds=3.0))
    gaps = [arrivals[n + 1] - arrivals[n] for n in range(1, 7)]  # after counted refusal n (0 was the warm-up)
    for n, gap in enumerate(gaps, start=1):
        assert gap <= min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** (n - 1)) + 0.05
    assert tally.accepted and tally.errors == 0


def test_the_generator_is_pinned_to_other_cores_than_the_server(tmp_path):
    from bench.closedloop import cores, generator_pinned, server_spec

    pinned = cores()
    before = os.sched_getaffinity(0)
    if pinned is None:  # one usable CPU: nothing to pin, and the bench says so
        assert len(before) == 1
        return
    server_core, generator = pinned
    assert int(server_core) not in generator
    spec = server_spec(tmp_path, tmp_path / "state.sqlite", {}, server_core)
    assert spec.command[:3] == ["taskset", "-c", server_core] and spec.env["CONVSERVE_WORKERS"] == "1"
    with generator_pinned(generator):
        assert os.sched_getaffinity(0) == generator
    assert os.sched_getaffinity(0) == before
