"""`llm_judge`: score completions with a judge model behind an OpenAI-compatible chat-completions endpoint.

The judge sees the question, the row's images (as base64 PNG `data:` URLs), the reference answer when the
dataset has one, the completion and a rubric, and ends its reply with `SCORE: <n>`. It works with a local
`vllm serve` as well as hosted endpoints. Only the standard library is used, so no client SDK is needed.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from vlm_rl.rewards.parsing import completion_text
from vlm_rl.rewards.registry import register_reward

DEFAULT_RUBRIC = (
    "You are grading a response to a question. Judge whether the response answers the question correctly, "
    "using the image(s) when there are any and the reference answer when one is given; a response that hedges "
    "between several answers is not correct. Briefly explain your reasoning, then give a score from {low} "
    "(wrong) to {high} (fully correct) on a final line of the form `SCORE: <n>`."
)

_SCORE_LINE = re.compile(r"(?i)\bscore\s*[:=]\s*\**\s*([-+]?\d+(?:\.\d+)?)")
_BARE_NUMBER = re.compile(r"\s*\**\s*([-+]?\d+(?:\.\d+)?)\s*\**\s*")
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}
_MAX_RETRY_AFTER = 30.0  # seconds; a longer Retry-After would stall the training step
_SHOWN_CHARS = 300  # how much of a reply or an error body goes into an exception message


class JudgeRequestError(RuntimeError):
    """The judge endpoint could not be reached or answered with an error, after all retries."""


class JudgeReplyError(ValueError):
    """The judge answered, but no valid score could be read from its reply."""


def _shorten(text: str, limit: int = _SHOWN_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… [{len(text) - limit} more characters]"


def _truncate_middle(text: str, max_chars: int) -> str:
    """Keep both ends of a runaway completion: the final answer is usually at its end."""
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max_chars - head
    return f"{text[:head]}\n[… {len(text) - max_chars} characters truncated …]\n{text[len(text) - tail :]}"


def _prompt_text(prompt: Any) -> str:
    """The question as text: a string prompt, or the text of every message (labelled by role if several)."""
    if isinstance(prompt, str):
        return prompt
    texts = [(message.get("role", "user"), completion_text(message.get("content") or "")) for message in prompt]
    if len(texts) == 1:
        return texts[0][1]
    return "\n\n".join(f"[{role}] {text}" for role, text in texts)


def _prompt_images(prompt: Any) -> list:
    """Images embedded in a conversational prompt's content blocks (TRL fills these from the image column)."""
    if isinstance(prompt, str):
        return []
    return [
        block["image"]
        for message in prompt
        if isinstance(message.get("content"), list)
        for block in message["content"]
        if isinstance(block, dict) and block.get("type") == "image" and block.get("image") is not None
    ]


def _png_data_url(image: Any) -> str:
    if not isinstance(image, Image.Image):
        raise TypeError(f"llm_judge expects PIL images in the `images` column, got {type(image).__name__}.")
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _judge_content(question: str, image_urls: list[str], reference: Any, response: str, rubric: str) -> Any:
    """The judge's user message: a plain string for text rows (any chat model accepts it), blocks with images."""
    before_images = f"{rubric}\n\n## Question\n"
    after_images = question
    if reference is not None and str(reference) != "":
        after_images += f"\n\n## Reference answer\n{reference}"
    after_images += f"\n\n## Response to grade\n{response}"
    if not image_urls:
        return before_images + after_images
    return [
        {"type": "text", "text": before_images},
        *({"type": "image_url", "image_url": {"url": url}} for url in image_urls),
        {"type": "text", "text": after_images},
    ]


def _error_body(error: urllib.error.HTTPError) -> str:
    """The start of an error reply's body (servers explain there, e.g. an unknown model name)."""
    try:
        return _shorten(error.read().decode(errors="replace"))
    except (OSError, http.client.HTTPException):
        return "<body unreadable>"


def _reply_text(body: bytes) -> str:
    shown = _shorten(body.decode(errors="replace"))
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise JudgeReplyError(f"The judge's answer is not an OpenAI chat completion ({error!r}): {shown!r}") from None
    if isinstance(content, list):  # some servers answer with content blocks
        content = "".join(block.get("text", "") for block in content if isinstance(block, dict))
    if not isinstance(content, str):
        raise JudgeReplyError(f"The judge's reply has no text content: {shown!r}")
    return content


def parse_score(reply: str, low: float, high: float) -> float:
    """The judge's score mapped from [low, high] to [0, 1]: the last `SCORE: n`, or a reply that is just a number."""
    matches = _SCORE_LINE.findall(reply)
    if matches:
        score = float(matches[-1])
    elif bare := _BARE_NUMBER.fullmatch(reply):
        score = float(bare.group(1))
    else:
        raise JudgeReplyError(f"No `SCORE: <n>` line in the judge's reply: {_shorten(reply)!r}")
    if not low <= score <= high:
        raise JudgeReplyError(f"Judge score {score:g} is outside [{low:g}, {high:g}]; reply: {_shorten(reply)!r}")
    return (score - low) / (high - low)


class _Endpoint:
    """POSTs to one chat-completions URL with retries; reads the API key per request, never stores or shows it."""

    def __init__(
        self,
        url: str,
        api_key_env: str | None,
        timeout: float,
        max_retries: int,
        retry_backoff: float,
        cancelled: threading.Event,
    ):
        self.url = url
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.cancelled = cancelled

    def post(self, payload: dict) -> bytes:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if self.cancelled.is_set():  # the call was interrupted or another sample failed
                raise JudgeRequestError(f"Request to the judge at {self.url} was cancelled.")
            delay = self.retry_backoff * 2**attempt
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                problem = f"HTTP {error.code} {error.reason}: {_error_body(error)}"
                if error.code not in _RETRYABLE_STATUS:
                    raise JudgeRequestError(self._message(problem, key, attempt, error.code)) from None
                retry_after = error.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, min(float(retry_after), _MAX_RETRY_AFTER))
            except TimeoutError:
                problem = f"timed out after {self.timeout:g} s"
            except urllib.error.URLError as error:
                is_timeout = isinstance(error.reason, TimeoutError)
                problem = f"timed out after {self.timeout:g} s" if is_timeout else f"connection failed: {error.reason}"
            except (OSError, http.client.HTTPException) as error:  # e.g. the server dropped the connection mid-reply
                problem = f"connection failed: {error!r}"
            if attempt + 1 < attempts:
                self.cancelled.wait(delay)
        raise JudgeRequestError(self._message(problem, key, self.max_retries))

    def _message(self, problem: str, key: str | None, retried: int, status: int | None = None) -> str:
        message = f"The judge at {self.url} failed ({problem}) after {retried} retr{'y' if retried == 1 else 'ies'}."
        if status in (401, 403):
            state = "is set" if key else "is not set"
            message += f" Check the API key: the environment variable {self.api_key_env!r} {state}."
        elif problem.startswith("connection failed"):
            message += " Is the server running (e.g. `vllm serve <model> --port 8000`) and `base_url` right?"
        return message.replace(key, "***") if key else message


@register_reward("llm_judge")
def llm_judge(
    prompts: list,
    completions: list,
    answer: list | None = None,
    images: list | None = None,
    *,
    base_url: str = "http://127.0.0.1:8000/v1",
    model: str | None = None,
    rubric: str = DEFAULT_RUBRIC,
    api_key_env: str | None = "OPENAI_API_KEY",
    max_concurrency: int = 8,
    timeout: float = 60.0,
    max_retries: int = 2,
    retry_backoff: float = 0.5,
    temperature: float = 0.0,
    max_tokens: int = 256,
    score_range: Sequence[float] = (0, 10),
    max_completion_chars: int = 8000,
    **kwargs,
) -> list[float]:
    """A judge model's score for each completion, mapped from `score_range` to [0, 1].

    `model` is the name the endpoint serves (`vllm serve ... --served-model-name judge` → `judge`). The API key
    is read from the environment variable named by `api_key_env` at call time (no header if it is unset).
    `{low}` and `{high}` in the rubric become the ends of `score_range`. Requests run `max_concurrency` at a
    time; each is retried `max_retries` times with exponential backoff on connection errors, timeouts, 429 and
    5xx. Raises `JudgeRequestError` when the endpoint keeps failing and `JudgeReplyError` for a reply without a
    valid score.
    """
    if not model:
        raise ValueError(
            "llm_judge needs `model`: the model name the endpoint serves, e.g. "
            "`kwargs: {model: judge}` for `vllm serve <path> --served-model-name judge`."
        )
    if len(score_range) != 2 or not float(score_range[0]) < float(score_range[1]):
        raise ValueError(f"llm_judge `score_range` must be [low, high] with low < high, got {list(score_range)}.")
    low, high = float(score_range[0]), float(score_range[1])
    if max_concurrency < 1 or max_retries < 0 or timeout <= 0 or max_completion_chars < 1:
        raise ValueError(
            "llm_judge needs max_concurrency >= 1, max_retries >= 0, timeout > 0 and max_completion_chars >= 1; "
            f"got {max_concurrency}, {max_retries}, {timeout}, {max_completion_chars}."
        )
    rubric = rubric.replace("{low}", f"{low:g}").replace("{high}", f"{high:g}")
    answers = answer if answer is not None else [None] * len(completions)
    row_images = images if images is not None else [_prompt_images(prompt) for prompt in prompts]
    cancelled = threading.Event()
    endpoint = _Endpoint(
        f"{base_url.rstrip('/')}/chat/completions", api_key_env, timeout, max_retries, retry_backoff, cancelled
    )

    encoded: dict[int, str] = {}  # GRPO repeats each row's images across its generations: encode them once
    payloads = []
    for prompt, completion, reference, row in zip(prompts, completions, answers, row_images, strict=True):
        row = [row] if isinstance(row, Image.Image) else row or []
        for image in row:
            if id(image) not in encoded:
                encoded[id(image)] = _png_data_url(image)
        urls = [encoded[id(image)] for image in row]
        response = _truncate_middle(completion_text(completion), max_completion_chars)
        content = _judge_content(_prompt_text(prompt), urls, reference, response, rubric)
        payloads.append(
            {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "temperature": temperature,
                "max_tokens": max_tokens,
            }
        )

    def judge_one(payload: dict) -> float:
        return parse_score(_reply_text(endpoint.post(payload)), low, high)

    executor = ThreadPoolExecutor(max_workers=min(max_concurrency, max(len(payloads), 1)))
    try:
        futures = [executor.submit(judge_one, payload) for payload in payloads]
        return [future.result() for future in futures]
    finally:
        # On an error or a SIGALRM time limit, do not wait for requests in flight: stop retries and move on.
        cancelled.set()
        executor.shutdown(wait=False, cancel_futures=True)
