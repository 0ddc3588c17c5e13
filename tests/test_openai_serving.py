"""`vllm serve` on a quamba checkpoint, driven by the official openai client.

One server for the whole module (engine starts dominate the run time): completions, streaming,
chat, and 64 requests from 16 concurrent clients. The last test stops the server and checks the
served greedy answers against offline ``LLM.generate`` in a subprocess, so that two engines never
share the two cores.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import openai
import pytest

from tests.test_serve import VLLM, _free_port, _wait_healthy
from tests.vllm_runner import ENGINE_ENV, greedy_in_subprocess

pytestmark = pytest.mark.vllm

SERVED_NAME = "tiny-quamba"
MAX_TOKENS = 16
CLIENTS = 16
# CPU decoding of the tiny model takes well under a second per request; the bounds only stop a
# hung server from hanging the suite.
REQUEST_TIMEOUT_S = 120
ALL_REQUESTS_TIMEOUT_S = 300
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0}
# ignore_eos: every answer has exactly MAX_TOKENS tokens, like the offline runner's.
# return_token_ids: the answer carries its prompt and completion token ids (a vLLM extension).
GREEDY_EXTRAS = {"ignore_eos": True, "return_token_ids": True}

OPENINGS = ["The", "In 1905,", "def main():", "Once upon a time", "Water boils", "A list of", "Python's", "Why"]
SUBJECTS = ["the river", "numbers", "the old library", "a small model", "the committee", "light", "memory", "trains"]
PROMPTS = [f"{opening} {subject}" for opening in OPENINGS for subject in SUBJECTS]  # 64 distinct prompts

# A checkpoint without a chat template gets one from the request (needs
# --trust-request-chat-template); the same file works as `vllm serve --chat-template FILE`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CHAT = [{"role": "user", "content": "Tell me about the river."}]


class Server:
    """A `vllm serve` process on a free loopback port, in its own process group."""

    def __init__(self, model: Path, log_path: Path):
        self.port = _free_port()
        self.log_path = log_path
        self._log = open(log_path, "w")
        self._process = subprocess.Popen(
            [str(VLLM), "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-model-len", "512",
             "--max-num-seqs", str(CLIENTS), "--enforce-eager", "--trust-request-chat-template"],
            env={**os.environ, **ENGINE_ENV}, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # the group holds the engine processes too: stop() ends them all
        )
        self._running = True

    @property
    def base_url(self) -> str:
        assert self._running, "the server was already stopped"
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_healthy(self) -> None:
        _wait_healthy(f"http://127.0.0.1:{self.port}", self._process)

    def log_tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        for sig, grace_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(self._process.pid, sig)
                self._process.wait(timeout=grace_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


@pytest.fixture(scope="module")
def server(quantized_tiny, tmp_path_factory):
    served = Server(quantized_tiny, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        served.wait_healthy()
    except Exception:
        print(served.log_tail())
        served.stop()
        raise
    yield served
    served.stop()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


async def complete_concurrently(base_url: str, prompts: list[str]) -> list:
    """CLIENTS clients, each with its own connection, take turns through the prompts."""

    async def one_client(first: int) -> list:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", timeout=REQUEST_TIMEOUT_S,
                                      max_retries=0) as async_client:
            return [
                (i, await async_client.completions.create(model=SERVED_NAME, prompt=prompts[i], **GREEDY,
                                                          extra_body=GREEDY_EXTRAS))
                for i in range(first, len(prompts), CLIENTS)
            ]

    per_client = await asyncio.wait_for(
        asyncio.gather(*(one_client(first) for first in range(CLIENTS))), ALL_REQUESTS_TIMEOUT_S
    )
    return [answer for _, answer in sorted(pair for answers in per_client for pair in answers)]


@pytest.fixture(scope="module")
def answers(server) -> list:
    """The non-streamed answers to PROMPTS, in PROMPTS order."""
    return asyncio.run(complete_concurrently(server.base_url, PROMPTS))


@pytest.fixture(scope="module")
def tokenizer(quantized_tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(quantized_tiny)


def test_every_concurrent_answer_is_complete(answers, tokenizer):
    assert len(answers) == len(PROMPTS)
    for prompt, answer in zip(PROMPTS, answers):
        (choice,) = answer.choices
        assert answer.model == SERVED_NAME
        assert choice.finish_reason == "length"
        assert answer.usage.completion_tokens == len(choice.token_ids) == MAX_TOKENS
        assert choice.prompt_token_ids == tokenizer(prompt)["input_ids"]
        assert answer.usage.prompt_tokens == len(choice.prompt_token_ids)
        assert choice.text and choice.text == tokenizer.decode(choice.token_ids, skip_special_tokens=True)


def test_streamed_text_equals_the_non_streamed_text(server, answers):
    with client(server) as sync_client:
        for prompt, answer in list(zip(PROMPTS, answers))[::16]:
            stream = sync_client.completions.create(
                model=SERVED_NAME, prompt=prompt, stream=True, stream_options={"include_usage": True},
                **GREEDY, extra_body={"ignore_eos": True},
            )
            chunks = list(stream)
            text_chunks = [c for c in chunks if c.choices]
            assert len(text_chunks) > 1  # really streamed, not one blob
            assert "".join(c.choices[0].text for c in text_chunks) == answer.choices[0].text
            assert text_chunks[-1].choices[0].finish_reason == "length"
            assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_chat_without_a_chat_template_is_a_clear_400(server):
    with client(server) as sync_client, pytest.raises(openai.BadRequestError) as refused:
        sync_client.chat.completions.create(model=SERVED_NAME, messages=CHAT, **GREEDY)
    assert refused.value.status_code == 400
    assert "chat template" in refused.value.message


def test_chat_with_a_chat_template_answers_like_the_rendered_completion(server, tokenizer, tmp_path):
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(CHAT_TEMPLATE)
    template = template_file.read_text()
    rendered = tokenizer.apply_chat_template(CHAT, chat_template=template, tokenize=False, add_generation_prompt=True)
    with client(server) as sync_client:
        chat = sync_client.chat.completions.create(
            model=SERVED_NAME, messages=CHAT, **GREEDY, extra_body={**GREEDY_EXTRAS, "chat_template": template},
        )
        completion = sync_client.completions.create(
            model=SERVED_NAME, prompt=rendered, **GREEDY, extra_body=GREEDY_EXTRAS,
        )
    (choice,) = chat.choices
    assert choice.finish_reason == "length"
    assert chat.usage.completion_tokens == MAX_TOKENS
    assert chat.prompt_token_ids == tokenizer(rendered)["input_ids"]  # the template was applied
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content == completion.choices[0].text


def test_served_greedy_answers_equal_offline_generate(server, answers, quantized_tiny):
    """Exact: both are greedy over the same token ids on the same engine code; batches differ
    (the server's are whatever the 16 clients made), and int8 activations with static scales
    leave no room for batch-dependent rounding to change a token (measured: identical)."""
    server.stop()  # never two engines on the two cores
    prompts = [a.choices[0].prompt_token_ids for a in answers]
    offline = greedy_in_subprocess(quantized_tiny, prompts, MAX_TOKENS, max_num_seqs=CLIENTS)
    assert [a.choices[0].token_ids for a in answers] == [o["token_ids"] for o in offline]
