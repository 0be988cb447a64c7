"""`python -m bench`: run the six cases and print one markdown report.

The report goes to stdout and progress to stderr. The exit status is 0 when every case
ran, whether or not its targets were met, 1 when a case failed to run, and 2 when the
benchmark could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from bench import report
from bench.cases import CASES, FULL, QUICK, Bench, Case
from bench.report import Failure, Row
from bench.service import StartError, running_mongo_test_server
from ots.logs import mask_uri

DROP_TIMEOUT_MS: Final = 30_000
SERVER_SELECTION_TIMEOUT_MS: Final = 5_000


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark ots against its KDF ceiling and under overload. Run it from "
        "the repository root; it starts the service, a MongoDB test server and a bare "
        "Tornado app on free ports of 127.0.0.1.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts and scrypt N=2^14, finishing in about a minute: checks that "
        "every case runs, not how fast (default: full run at N=2^17, several minutes)",
    )
    parser.add_argument(
        "--mongo-uri",
        metavar="URI",
        help="use this MongoDB instead of starting tests/mongo_server.py; the benchmark "
        "creates a database named ots_bench_<random> there and drops it at the end",
    )
    parser.add_argument(
        "--case",
        type=int,
        action="append",
        choices=range(1, len(CASES) + 1),
        metavar="N",
        help="run only case N (1 to 6); repeat the option for several (default: all)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    arguments = parse_arguments(argv)
    shown_argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return asyncio.run(_run_with_logs(arguments, shown_argv))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every server it started was stopped", file=sys.stderr)
        return 130


async def run(arguments: argparse.Namespace, argv: Sequence[str], log_dir: Path) -> int:
    """Start the database, run every case, print the report; returns the exit status."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    plan = QUICK if arguments.quick else FULL
    selected = set(arguments.case or range(1, len(CASES) + 1))
    database = f"ots_bench_{secrets.token_hex(4)}"
    header = [("date", report.timestamp()), ("command", report.command_line(argv))]
    header += report.machine_facts()
    rows: list[Row] = []
    failures: list[Failure] = []
    started = time.monotonic()

    async with contextlib.AsyncExitStack() as stack:
        if arguments.mongo_uri:
            mongo_uri = arguments.mongo_uri
            header.append(("database", f"MongoDB at {mask_uri(mongo_uri)}"))
        else:
            try:
                mongo_uri = await stack.enter_async_context(running_mongo_test_server(log_dir))
            except StartError as error:
                print(f"bench: could not start the MongoDB test server: {error}", file=sys.stderr)
                return 2
            header.append(("database", "MongoDB test server (tests/mongo_server.py, mongomock)"))
        bench = Bench(plan, mongo_uri, database, log_dir)
        header += _service_facts(bench)
        try:
            for number, (title, case) in enumerate(CASES, start=1):
                if number not in selected:
                    continue
                outcome = await _run_case(bench, number, title, case)
                if isinstance(outcome, Failure):
                    failures.append(outcome)
                else:
                    rows += outcome
        finally:
            await _drop_database(mongo_uri, database)

    header.append(("duration", f"{time.monotonic() - started:.0f} s"))
    print(report.render(rows, failures, header=header, notes=NOTES), end="")
    return _finish(len(selected), failures, log_dir)


async def _run_with_logs(arguments: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark; keep the servers' logs only when a case failed to run."""
    log_dir = Path(tempfile.mkdtemp(prefix="ots-bench-"))
    status = 2
    try:
        status = await run(arguments, argv, log_dir)
    finally:
        if status != 1:
            shutil.rmtree(log_dir, ignore_errors=True)
    return status


async def _run_case(bench: Bench, number: int, title: str, case: Case) -> list[Row] | Failure:
    """Run one case on a clean database, within the plan's time limit."""
    print(f"bench: case {number} of {len(CASES)}: {title}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        await _drop_database(bench.mongo_uri, bench.database)
        rows = await asyncio.wait_for(case(bench), bench.plan.case_timeout)
    except Exception as error:  # noqa: BLE001 - a failed case is reported; the others run
        traceback.print_exc(file=sys.stderr)
        message = str(error).splitlines()[0] if str(error) else ""
        return Failure(f"{number} {title}", f"{type(error).__name__}: {message}".rstrip(": "))
    print(f"bench: case {number} done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return rows


async def _drop_database(uri: str, database: str) -> None:
    """Drop the benchmark's database, so each case starts from an empty one."""
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        uri, timeoutMS=DROP_TIMEOUT_MS, serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS
    )
    try:
        await client.drop_database(database)
    except PyMongoError as error:
        print(f"bench: could not drop database {database}: {error}", file=sys.stderr)
    finally:
        await client.close()


def _service_facts(bench: Bench) -> list[tuple[str, str]]:
    params = bench.kdf_params
    mode = "quick" if bench.plan.quick else "full"
    return [
        ("mode", mode),
        (
            "service",
            f"python -m ots, scrypt N=2^{params.n.bit_length() - 1} r={params.r} p={params.p} "
            f"({params.memory_bytes // 2**20} MiB per derivation), "
            f"KDF_WORKERS={bench.workers} and KDF_QUEUE_SIZE={bench.queue_size} (defaults), "
            "RATE_LIMIT_PER_MINUTE=0, LOG_LEVEL=WARNING",
        ),
    ]


def _finish(selected: int, failures: Sequence[Failure], log_dir: Path) -> int:
    """Print the closing line and return the exit status."""
    if failures:
        print(f"bench: {len(failures)} of {selected} cases failed; logs in {log_dir}")
        return 1
    if selected == len(CASES):
        print(f"bench: all {selected} cases ran")
    else:
        print(f"bench: {selected} of {len(CASES)} cases ran (selected with --case)")
    return 0


NOTES: Final = (
    "Ratios compare each figure with a baseline measured in the same run on the same "
    "machine, so they carry over between machines better than the absolute figures.",
    "The benchmark client, the service, the MongoDB server and the bare app share the "
    "machine's cores; on 2 cores the client's CPU time comes out of the service's share.",
    "Saturation means KDF_WORKERS + 2 requests in flight (closed loop). The overload "
    "case is open-loop: requests go out at a fixed rate whatever the responses, latency "
    "counts from when a request was due, and accepted throughput counts 201 responses "
    "that finished after the warm-up and before the offered load stopped.",
    "Every case measures against one raw KDF rate, taken in case 1 (or by the first case "
    "run); load from other programs that changes during the run moves the ratios.",
    "The 201 p99 under overload is compared with the time a request admitted to a full "
    "pool waits: (KDF_WORKERS + KDF_QUEUE_SIZE) / raw derivations per second.",
    "Cheap paths and their bare baselines run alternately; each keeps its best round. "
    "The unknown key is well-formed, so the 404 includes one database lookup.",
    "Large secrets run on services with scrypt N=2^14 (16 MiB per derivation) whatever "
    "the mode, so that scrypt's memory cannot hide the payload's. Each generate and each "
    "read runs on a freshly started service after a warm-up; RSS growth is the peak "
    "(the kernel's VmHWM, reset before the request, or the 10 ms samples, whichever is "
    "higher) minus the RSS before the request, less the same figure for a 1-byte secret.",
    "The memory target (peak growth at most 1.25 times workers times scrypt memory) is this "
    "benchmark's own: every worker's scrypt buffer plus a quarter for requests in flight.",
)


if __name__ == "__main__":
    raise SystemExit(main())
