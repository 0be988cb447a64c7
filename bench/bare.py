"""A bare Tornado JSON app, the baseline for ots's cheap paths and large transfers.

It runs in the same process layout as ots (one process, one asyncio event loop, one
`HTTPServer`) and does the least a JSON API must: parse the body and write a JSON response.

    python -m bench.bare --port 8001

Routes:

* `GET /healthz`, `GET /json`: a small JSON object.
* `POST /json`: parse the JSON body and return the number of its members.
* `GET /blob/{n}`: a JSON object `{"secret": "..."}` with n ASCII characters, written and
  flushed in 256 KiB pieces as ots streams a large secret.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Sequence
from typing import Final

import tornado.httpserver
import tornado.web

PIECE_BYTES: Final = 256 * 1024
# Room for a 32 MiB secret escaped in JSON, as ots allows on /generate.
MAX_BODY_BYTES: Final = 2 * 32 * 1024 * 1024 + 64 * 1024


class JsonHandler(tornado.web.RequestHandler):
    """A JSON resource that does no work beyond parsing the body and responding."""

    def get(self) -> None:
        """Write a small JSON object."""
        self.write({"status": "ok"})

    def post(self) -> None:
        """Parse the body as JSON and return how many members it has."""
        document = json.loads(self.request.body)
        self.write({"members": len(document)})


class BlobHandler(tornado.web.RequestHandler):
    """A large JSON string, streamed in pieces."""

    async def get(self, size_text: str) -> None:
        """Write `{"secret": "xxx..."}` with `size_text` characters, flushing each piece."""
        remaining = int(size_text)
        piece = b"x" * PIECE_BYTES
        self.set_header("Content-Type", "application/json")
        self.write(b'{"secret": "')
        while remaining > 0:
            self.write(piece[:remaining])
            remaining -= PIECE_BYTES
            await self.flush()
        self.finish(b'"}')


def make_app() -> tornado.web.Application:
    """Build the bare application."""
    return tornado.web.Application(
        [
            (r"/healthz", JsonHandler),
            (r"/json", JsonHandler),
            (r"/blob/([0-9]+)", BlobHandler),
        ]
    )


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    server = tornado.httpserver.HTTPServer(make_app(), max_body_size=MAX_BODY_BYTES)
    server.listen(port, address="127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and serve; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.bare", description="Serve the bare Tornado JSON baseline app."
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    arguments = parser.parse_args(argv)
    asyncio.run(serve(arguments.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
