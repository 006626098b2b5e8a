"""`llm_judge` against a real OpenAI-compatible HTTP server running in a thread of the test process.

The server judges like a careful grader would: for an image row it decodes the PNG it received and reads the
square's colour, for a text row it compares with the reference answer it was sent.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import no_hang
from PIL import Image
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.rewards.judge import JudgeReplyError, JudgeRequestError, llm_judge, parse_score
from vlm_rl.rewards.registry import REWARD_REGISTRY
from vlm_rl.rewards.timeout import RewardTimeout, time_limit

KEY = "sk-test-7c1f3a9e-must-not-leak"
KEY_ENV = "VLM_RL_TEST_JUDGE_KEY"
COLOURS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255)}
RESPONSE_HEADING = "## Response to grade\n"
REFERENCE_HEADING = "## Reference answer\n"


def square(colour: str, mode: str = "RGB") -> Image.Image:
    return Image.new("RGB", (16, 16), COLOURS[colour]).convert(mode)


def split_content(payload: dict) -> tuple[str, list[str]]:
    """The text and the image URLs of the judge request's single user message."""
    content = payload["messages"][0]["content"]
    if isinstance(content, str):
        return content, []
    text = "".join(block["text"] for block in content if block["type"] == "text")
    return text, [block["image_url"]["url"] for block in content if block["type"] == "image_url"]


def grade(payload: dict) -> str:
    """Score 10 when the response names the truth: the image's colour, or else the reference answer."""
    text, urls = split_content(payload)
    response = text.rsplit(RESPONSE_HEADING, 1)[1].lower()
    if urls:
        header, data = urls[0].split(",", 1)
        if header != "data:image/png;base64":
            raise ValueError(f"not a base64 PNG data URL: {header}")
        colour = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").getpixel((0, 0))
        truth = next(name for name, rgb in COLOURS.items() if rgb == colour)
    elif REFERENCE_HEADING in text:
        truth = text.split(REFERENCE_HEADING, 1)[1].split("\n\n", 1)[0].lower()
    else:
        return "There is nothing to compare with, so I am unsure.\nSCORE: 5"
    verdict = "matches" if truth in response else "does not match"
    return f"The response {verdict} the truth ({truth}).\nSCORE: {10 if truth in response else 0}"


class JudgeServer(ThreadingHTTPServer):
    """`POST /v1/chat/completions` with bearer-token auth; failures and delays are set per test."""

    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), JudgeHandler)
        self.lock = threading.Lock()
        self.bodies: list[bytes] = []
        self.auth_headers: list[str | None] = []
        self.active = 0
        self.max_active = 0
        self.failures: list[int] = []  # statuses to answer with, one per request, before judging normally
        self.delay = 0.0
        self.reply: Callable[[dict], str] = grade
        self.stop = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    @property
    def payloads(self) -> list[dict]:
        return [json.loads(body.decode("utf-8")) for body in self.bodies]


class JudgeHandler(BaseHTTPRequestHandler):
    server: JudgeServer

    def log_message(self, format, *args):  # keep the test output clean
        pass

    def send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        server = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        auth = self.headers.get("Authorization")
        with server.lock:
            server.bodies.append(body)
            server.auth_headers.append(auth)
            server.active += 1
            server.max_active = max(server.max_active, server.active)
            status = server.failures.pop(0) if server.failures else 200
        hang_up = server.stop.wait(server.delay)  # set when the test is over: hang up without answering
        if self.path != "/v1/chat/completions":
            status, answer = 404, {"error": {"message": f"no route {self.path}"}}
        elif auth != f"Bearer {KEY}":
            status, answer = 401, {"error": {"message": "invalid API key"}}
        elif status != 200:
            # A careless server that echoes the credentials: the reward must still not show them.
            answer = {"error": {"message": f"failing on purpose (Authorization: {auth})"}}
        else:
            content = server.reply(json.loads(body.decode("utf-8")))  # strict UTF-8
            message = {"role": "assistant", "content": content}
            answer = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        with server.lock:  # before answering: the client may send its next request as soon as it has the reply
            server.active -= 1
        if not hang_up:
            self.send_json(status, answer)


def use_local_judge(monkeypatch) -> None:
    """The judge's key in the environment, and no proxy between the client and a server on 127.0.0.1."""
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def server(monkeypatch):
    use_local_judge(monkeypatch)
    judge_server = JudgeServer()
    thread = threading.Thread(target=judge_server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield judge_server
    judge_server.stop.set()
    judge_server.shutdown()
    judge_server.server_close()


def ask(server: JudgeServer, prompts, completions, **kwargs) -> list[float]:
    settings = {"base_url": server.base_url, "model": "judge", "api_key_env": KEY_ENV, "retry_backoff": 0.01}
    return llm_judge(prompts, completions, **{**settings, **kwargs})


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "Answer in <answer> tags."}, {"role": "user", "content": text}]


def said(*texts: str) -> list[list[dict]]:
    return [[{"role": "assistant", "content": text}] for text in texts]


def test_registered_under_its_logged_name():
    assert REWARD_REGISTRY["llm_judge"] is llm_judge
    assert llm_judge.__name__ == "llm_judge"


def test_image_rows_are_judged_by_the_image_and_text_rows_by_the_reference(server):
    red = square("red")
    colour_question, sum_question = chat("What colour is the square?"), chat("What is 2 + 3?")
    scores = ask(
        server,
        prompts=[colour_question, colour_question, colour_question, sum_question, sum_question],
        completions=said("<answer>red</answer>", "<answer>blue</answer>", "It is blue.", "5", "6"),
        answer=["red", "red", "blue", "5", "5"],
        images=[[red], red, [square("blue", mode="CMYK")], [], None],  # a lone image is taken as one
    )
    assert scores == [1.0, 0.0, 1.0, 1.0, 0.0]
    payloads = server.payloads
    assert server.auth_headers == [f"Bearer {KEY}"] * 5
    assert {(p["model"], p["temperature"], p["max_tokens"]) for p in payloads} == {("judge", 0.0, 256)}
    contents = [split_content(p) for p in payloads]
    assert sorted(len(urls) for _, urls in contents) == [0, 0, 1, 1, 1]
    for payload, (text, urls) in zip(payloads, contents, strict=True):
        assert "What colour" in text if urls else "What is 2 + 3?" in text
        assert "[system] Answer in <answer> tags." in text and "SCORE: <n>" in text and "from 0 " in text
        if not urls:  # text rows send a plain string, which any chat model accepts
            assert isinstance(payload["messages"][0]["content"], str)


def test_images_embedded_in_prompts_are_sent_when_there_is_no_images_column(server):
    prompt = prepare_multimodal_messages([{"role": "user", "content": "Colour?"}], images=[square("green")])
    assert ask(server, [prompt, prompt], ["green", "red"]) == [1.0, 0.0]
    assert [len(split_content(p)[1]) for p in server.payloads] == [1, 1]


def test_without_an_answer_column_no_reference_is_sent(server):
    assert ask(server, ["What is 2 + 3?"], ["5"]) == [0.5]
    assert REFERENCE_HEADING not in split_content(server.payloads[0])[0]


def test_requests_run_concurrently_up_to_max_concurrency(server):
    server.delay = 0.1
    rows = {"prompts": ["What is 2 + 3?"] * 6, "completions": ["5"] * 6, "answer": ["5"] * 6}
    assert ask(server, **rows, max_concurrency=3) == [1.0] * 6
    assert 1 < server.max_active <= 3
    server.max_active = 0
    assert ask(server, **rows, max_concurrency=1) == [1.0] * 6
    assert server.max_active == 1


def test_503_and_429_are_retried_then_succeed(server):
    server.failures = [503, 429]
    assert ask(server, ["What is 2 + 3?"], ["5"], answer=["5"], max_retries=2) == [1.0]
    assert len(server.bodies) == 3


def test_persistent_500_raises_naming_the_endpoint_without_the_key(server):
    server.failures = [500] * 10
    with pytest.raises(JudgeRequestError) as raised:
        ask(server, ["q"], ["a"], max_retries=2)
    message = str(raised.value)
    assert f"{server.base_url}/chat/completions" in message and "HTTP 500" in message and "2 retries" in message
    assert "failing on purpose" in message  # the server's explanation is kept...
    assert KEY not in "".join(traceback.format_exception(raised.value))  # ...but the key it echoed is not
    assert len(server.bodies) == 3


def test_401_is_not_retried_and_points_at_the_key_variable(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(JudgeRequestError, match=rf"HTTP 401.*'{KEY_ENV}' is set") as raised:
        ask(server, ["q"], ["a"], max_retries=3)
    assert "sk-wrong" not in str(raised.value)
    assert len(server.bodies) == 1
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeRequestError, match=rf"'{KEY_ENV}' is not set"):
        ask(server, ["q"], ["a"], max_retries=3)
    assert server.auth_headers[1] is None  # no empty bearer header is sent


def test_a_server_that_is_not_running_gives_a_hint():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(JudgeRequestError, match=rf"127.0.0.1:{port}/v1/chat/completions.*Is the server running"):
        llm_judge(["q"], ["a"], base_url=f"http://127.0.0.1:{port}/v1/", model="judge", retry_backoff=0.01)


def test_a_reply_without_a_score_raises_with_the_reply(server):
    server.reply = lambda payload: "I would rather not grade this one."
    with pytest.raises(JudgeReplyError, match="I would rather not grade this one"):
        ask(server, ["q"], ["a"])


def test_a_hung_server_times_out_promptly(server):
    server.delay = 30.0
    with no_hang(10), pytest.raises(JudgeRequestError, match=r"timed out after 0.2 s.*after 1 retry"):
        ask(server, ["q"], ["a"], timeout=0.2, max_retries=1)
    assert len(server.bodies) == 2


def test_an_outer_time_limit_interrupts_the_call_without_waiting_for_the_pool(server):
    server.delay = 30.0
    with no_hang(10), pytest.raises(RewardTimeout, match="llm_judge"), time_limit(0.3, "llm_judge"):
        ask(server, ["q"] * 4, ["a"] * 4, timeout=60.0)


def test_an_interrupted_call_stops_retrying_in_the_background(server):
    server.failures = [503] * 1000
    server.delay = 0.05
    with pytest.raises(RewardTimeout), time_limit(0.3, "llm_judge"):
        ask(server, ["q"] * 2, ["a"] * 2, max_retries=100)
    time.sleep(0.2)  # requests already in flight may still land
    settled = len(server.bodies)
    time.sleep(0.3)
    assert len(server.bodies) == settled


def test_long_unicode_completions_are_truncated_keeping_both_ends(server):
    runaway = "début ✓ " + "🙂é" * 20_000 + " fin: red"
    short = "红色 — red ✓"
    red = square("red")
    scores = ask(server, ["Colour?"] * 2, [runaway, short], images=[[red], [red]], max_completion_chars=200)
    assert scores == [1.0, 1.0]  # the answer at the end of the runaway completion survives the cut
    assert all("🙂".encode() in body or short.encode() in body for body in server.bodies)  # raw UTF-8, not \u
    responses = sorted((split_content(p)[0].rsplit(RESPONSE_HEADING, 1)[1] for p in server.payloads), key=len)
    assert responses[0] == short
    assert responses[1].startswith("début ✓ 🙂é") and responses[1].endswith("🙂é fin: red")
    assert "characters truncated" in responses[1] and len(responses[1]) < 300


def test_parse_score_reads_the_last_score_or_a_bare_number():
    assert parse_score("Looks right.\nSCORE: 7", 0, 10) == 0.7
    assert parse_score("Score: 2 at first glance...\n**SCORE:** 8/10", 0, 10) == 0.8
    assert parse_score(" 10\n", 0, 10) == 1.0
    assert parse_score("SCORE: 3", 1, 5) == 0.5
    with pytest.raises(JudgeReplyError, match="outside"):
        parse_score("SCORE: 11", 0, 10)
    with pytest.raises(JudgeReplyError, match="no idea"):
        parse_score("no idea", 0, 10)


def test_bad_settings_are_reported_before_any_request():
    with pytest.raises(ValueError, match="needs `model`"):
        llm_judge(["q"], ["a"])
    with pytest.raises(ValueError, match="score_range"):
        llm_judge(["q"], ["a"], model="judge", score_range=(10, 0))
    with pytest.raises(ValueError, match="score_range"):
        llm_judge(["q"], ["a"], model="judge", score_range=[10])
