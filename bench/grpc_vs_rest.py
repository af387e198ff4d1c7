"""``python -m bench.grpc_vs_rest``: the Open Inference Protocol over gRPC against REST v2 (binary tensor extension).

One ``python -m service`` on the bundled mnist serves both protocols. Closed-loop load at concurrency c (32) from
one asyncio loop in this process: ``grpc.aio`` on Triton's ``GRPCInferenceService`` stub (``raw_input_contents``)
and ``aiohttp`` posting the binary v2 body (``binary_data_output``), each request prepared once, so the two
generators cost the client about the same. Requests of 1 and 64 images; rounds alternate the protocols so a
busy shared machine slows both alike, and the ratio is taken per round, then its median reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import numpy as np

from bench.load import v2_binary_body
from bench.servers import free_port, running
from bench.targets import ROOT, OursConfig, model_repositories, ours
from service.protos import grpc_service_pb2 as pb
from service.protos import grpc_service_pb2_grpc as pb_grpc

Call = Callable[[], Awaitable[bool]]


def grpc_request(rows: int, seed: int = 0) -> pb.ModelInferRequest:
    """The same tensor as :func:`bench.load.v2_binary_body`, as a gRPC ModelInfer request."""
    x = np.random.default_rng(seed).integers(0, 256, (rows, 28, 28, 1)).astype("<f4")
    request = pb.ModelInferRequest(model_name="mnist")
    request.inputs.add(name="image", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


async def closed_loop(call: Call, concurrency: int, seconds: float) -> tuple[int, int, float]:
    """``concurrency`` callers repeating ``call`` for ``seconds``: (successes, failures, elapsed seconds)."""
    ok = failed = 0
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal ok, failed
        while time.perf_counter() < stop:
            if await call():
                ok += 1
            else:
                failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return ok, failed, time.perf_counter() - started


def rest_call(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> Call:
    async def call() -> bool:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status == 200

    return call


def rpc_call(stub: pb_grpc.GRPCInferenceServiceStub, message: pb.ModelInferRequest) -> Call:
    async def call() -> bool:
        try:
            await stub.ModelInfer(message, timeout=30)
            return True
        except grpc.aio.AioRpcError:
            return False

    return call


async def measure(http_url: str, grpc_target: str, sizes: list[int], concurrency: int, seconds: float,
                  rounds: int) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session, grpc.aio.insecure_channel(
            grpc_target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for rows in sizes:
            body, header_length = v2_binary_body(rows)
            headers = {"Inference-Header-Content-Length": str(header_length),
                       "Content-Type": "application/octet-stream"}
            message = grpc_request(rows)

            rest = rest_call(session, f"{http_url}/v2/models/mnist/infer", body, headers)
            grpc_call = rpc_call(stub, message)

            await closed_loop(rest, concurrency, min(2.0, seconds))  # warm both paths and the batcher
            await closed_loop(grpc_call, concurrency, min(2.0, seconds))
            for index in range(rounds):
                order = [("rest", rest), ("grpc", grpc_call)]
                if index % 2:
                    order.reverse()  # alternate which protocol goes first
                for protocol, call in order:
                    ok, failed, elapsed = await closed_loop(call, concurrency, seconds)
                    row = {"protocol": protocol, "images": rows, "round": index, "requests": ok, "failed": failed,
                           "req_s": ok / elapsed, "images_s": ok * rows / elapsed}
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    results.append(row)
    return results


def summary(results: list[dict[str, object]]) -> list[str]:
    lines = ["| images/request | REST v2 binary req/s | gRPC req/s | REST images/s | gRPC images/s | gRPC/REST "
             "(median of per-round ratios) | failed |", "|---|---|---|---|---|---|---|"]
    for rows in sorted({r["images"] for r in results}):
        by = {(r["protocol"], r["round"]): r for r in results if r["images"] == rows}
        rounds = sorted({k[1] for k in by})
        rest = statistics.median(by["rest", i]["req_s"] for i in rounds)
        grpc_ = statistics.median(by["grpc", i]["req_s"] for i in rounds)
        ratios = [by["grpc", i]["req_s"] / by["rest", i]["req_s"] for i in rounds]
        failed = sum(r["failed"] for r in by.values())
        lines.append(f"| {rows} | {rest:.0f} | {grpc_:.0f} | {rest * rows:.0f} | {grpc_ * rows:.0f} | "
                     f"{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) | {failed} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_vs_rest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measured window")
    parser.add_argument("--rounds", type=int, default=3, help="alternated REST/gRPC rounds per request size")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sizes", default="1,64", help="images per request")
    parser.add_argument("--threads", type=int, default=1, help="inference threads of the server")
    parser.add_argument("--json", type=Path, help="also write every window here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        grpc_port = free_port()
        spec = ours(OursConfig(batching=True, max_batch_size=64), model_repositories(Path(tmp)), args.threads,
                    # a queue that holds every caller's rows: the bench measures throughput, not refusals
                    extra_env={"CONVSERVE_GRPC_PORT": str(grpc_port),
                               "CONVSERVE_MAX_QUEUE_SIZE": str(args.concurrency * max(sizes))})
        with running(spec, ROOT, Path(tmp)) as server:
            results = asyncio.run(measure(server.base_url, f"127.0.0.1:{grpc_port}", sizes, args.concurrency,
                                          args.seconds, args.rounds))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"c={args.concurrency}, {args.rounds} alternated rounds of {args.seconds:g}s, batching b64/0us, "
          f"{args.threads} inference thread(s)")
    print("\n".join(summary(results)))


if __name__ == "__main__":
    main()
