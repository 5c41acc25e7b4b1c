"""The spot watcher against a stand-in for the EC2 instance metadata service (IMDSv2) on 127.0.0.1: it keeps polling
while there is no notice, and drains the node exactly once, with AWS's reclaim time as deadline, when one appears."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from concerto_ray import spot_watcher

RECLAIM = "2026-12-01T15:02:00Z"


class FakeImds:
    """IMDSv2: PUT /latest/api/token gives a session token; the notice answers 401 without it, 404 until
    `notice_after` polls have been answered (or `announce` was called), then AWS's JSON."""

    def __init__(self, notice_after: int):
        self.notice_after = notice_after
        self.reclaim = RECLAIM
        self.polls = 0
        self.unauthorized = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):
                assert self.path == spot_watcher.TOKEN_PATH and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
                self._answer(200, b"session-token-1")

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != "session-token-1":
                    fake.unauthorized += 1
                    return self._answer(401, b"")
                assert self.path == spot_watcher.NOTICE_PATH
                fake.polls += 1
                if fake.polls <= fake.notice_after:
                    return self._answer(404, b"Not Found")
                self._answer(200, json.dumps({"action": "terminate", "time": fake.reclaim}).encode())

            def _answer(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def announce(self, reclaim: datetime) -> None:
        """Give the notice from the next poll on, with `reclaim` (whole seconds, as AWS writes it)."""
        self.reclaim = reclaim.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.notice_after = self.polls


@pytest.fixture
def imds():
    servers = []
    yield lambda notice_after: servers.append(FakeImds(notice_after)) or servers[-1]
    for fake in servers:
        fake.server.shutdown()


def test_no_notice_reads_as_none_and_a_notice_as_its_deadline(imds):
    fake = imds(notice_after=1)
    assert spot_watcher.read_notice(fake.url) is None
    notice = spot_watcher.read_notice(fake.url)
    expected_ms = int(datetime(2026, 12, 1, 15, 2, tzinfo=timezone.utc).timestamp() * 1000)
    assert notice == spot_watcher.Notice(action="terminate", deadline_ms=expected_ms)
    assert fake.unauthorized == 0  # every read went through an IMDSv2 session token


def test_the_node_is_drained_once_when_the_notice_comes(imds):
    fake = imds(notice_after=3)
    drained = []
    notice = spot_watcher.watch(lambda: spot_watcher.read_notice(fake.url), drained.append, interval_s=0.01)
    assert fake.polls == 4  # three polls without a notice, then the notice
    assert drained == [notice] and notice.action == "terminate"


def test_an_unreachable_metadata_service_is_retried_not_fatal(imds):
    fake = imds(notice_after=0)
    answers = iter([OSError("connection refused")])

    def read():
        error = next(answers, None)
        if error is not None:
            raise error
        return spot_watcher.read_notice(fake.url)

    drained = []
    assert spot_watcher.watch(read, drained.append, interval_s=0.01) is not None and len(drained) == 1


def test_a_stopped_watch_drains_nothing(imds):
    fake = imds(notice_after=10**6)
    stop = threading.Event()
    drained = []
    watcher = threading.Thread(
        target=lambda: spot_watcher.watch(
            lambda: spot_watcher.read_notice(fake.url), drained.append, interval_s=0.01, stop=stop
        )
    )
    watcher.start()
    while fake.polls < 3:
        threading.Event().wait(0.01)
    stop.set()
    watcher.join(timeout=10)
    assert not watcher.is_alive() and drained == []
