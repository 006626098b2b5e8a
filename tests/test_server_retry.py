"""`ServerRetry` against a real HTTP server on 127.0.0.1 that is stopped and started again on the same port: the
waits, the weights sent again before anything else, the bound when the server stays away. (The same with a real
vLLM server and a training run: `tests/test_faults_vllm.py`, scale suite.)"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from vlm_rl.rollout.server_retry import ServerRetry, session_without_connection_retries


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.server.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_POST = do_GET


class Endpoint:
    """A server that can be stopped (connections refused) and started again on its port; records the paths asked."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.server = None
        self.start()
        self.port = self.server.server_address[1]

    def start(self, port: int = 0) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.server.paths = self.paths
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def endpoint():
    endpoint = Endpoint()
    yield endpoint
    endpoint.stop()


def get(session: requests.Session, url: str) -> str:
    response = session.get(url, timeout=5)
    response.raise_for_status()
    return response.text


def test_a_server_that_comes_back_gets_the_weights_before_the_retried_request(endpoint, caplog):
    session = requests.Session()
    session_without_connection_retries(session, pool_size=4)
    retry = ServerRetry(endpoint.url, timeout=30, resync=lambda: get(session, f"{endpoint.url}/resync"))
    assert retry.call("generation", get, session, f"{endpoint.url}/generate", stand_in=None) == "ok"
    endpoint.stop()
    threading.Timer(1.5, endpoint.start, kwargs={"port": endpoint.port}).start()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert retry.call("generation", get, session, f"{endpoint.url}/generate", stand_in=None) == "ok"
    assert time.monotonic() - start < 10
    # The weights went to the new server first, then the request was sent again; once.
    assert endpoint.paths == ["/generate", "/resync", "/generate"]
    assert retry.resyncs == 1 and retry.gone is None
    waits = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(waits) >= 2 and "retrying generation in 1 s" in waits[0] and "retrying generation in 2 s" in waits[1]
    assert "answers again after" in caplog.text


def test_a_server_that_stays_away_is_given_up_on_within_the_timeout(endpoint, caplog):
    endpoint.stop()
    session = requests.Session()
    session_without_connection_retries(session, pool_size=4)
    retry = ServerRetry(endpoint.url, timeout=2.6, resync=lambda: get(session, f"{endpoint.url}/resync"))
    start = time.monotonic()
    assert retry.call("weight sync", get, session, f"{endpoint.url}/sync", stand_in="given up") == "given up"
    assert 2.6 <= time.monotonic() - start < 4.5
    assert f"The vLLM server at {endpoint.url} did not answer for 3 s (vllm_server_retry_timeout: 2.6 s)" in str(
        retry.gone
    )
    assert "ConnectionError" in str(retry.gone) and "--resume_from_checkpoint auto" in str(retry.gone)
    # Every later call is skipped at once: the trainer is stopping.
    start = time.monotonic()
    assert retry.call("generation", get, session, f"{endpoint.url}/generate", stand_in=[]) == []
    assert time.monotonic() - start < 0.1 and retry.resyncs == 0


def test_without_a_way_to_resend_the_weights_a_server_that_came_back_is_given_up_on(endpoint):
    """`vllm_weight_transport: nccl`: a restarted server would generate from its base weights."""
    session = requests.Session()
    session_without_connection_retries(session, pool_size=4)
    endpoint.stop()
    threading.Timer(0.5, endpoint.start, kwargs={"port": endpoint.port}).start()
    retry = ServerRetry(endpoint.url, timeout=30, resync=None)
    assert retry.call("generation", get, session, f"{endpoint.url}/generate", stand_in=None) is None
    assert "came back after an outage" in str(retry.gone) and "nccl" in str(retry.gone)
    assert "/generate" not in endpoint.paths


def test_the_session_fails_a_refused_connection_at_once_for_the_retry_loop(endpoint):
    """TRL's session retries a refused connection 5 times in about a minute, silently; ours leaves it to
    `ServerRetry`, which sends the weights again first."""
    endpoint.stop()
    session = requests.Session()
    session_without_connection_retries(session, pool_size=4)
    start = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        session.get(f"{endpoint.url}/generate", timeout=5)
    assert time.monotonic() - start < 1
