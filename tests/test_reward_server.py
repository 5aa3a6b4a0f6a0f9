"""The reward server (``python -m flowgym.rewards.serve``) and its client ``reward=remote``, on localhost."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from algos.trainer import Trainer
from flowgym.rewards import Reward, make_reward
from flowgym.rewards.remote import RemoteReward, RemoteRewardError
from flowgym.rewards.serve import RewardServer, parse_reward_args
from flowgym.rewards.wire import encode_images
from sample_loss_toys import comparable, run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served():
    """A digit_alignment server on a free localhost port, serving from a thread."""
    server = RewardServer(make_reward("digit_alignment"), "digit_alignment", port=0, max_batch=64, max_bytes=2**20)
    server.start()
    yield server
    server.shutdown()
    server.server_close()


def digit_images(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), [str(i % 10) for i in range(n)]


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_scores_equal_the_local_reward_bit_for_bit(served):
    images, prompts = digit_images(10)
    remote = RemoteReward(served.url, batch_size=4)(images, prompts)  # three requests: 4 + 4 + 2
    # The same chunks scored locally: a CPU matmul's rounding may depend on the batch size
    # (it does on some CI machines), so bit-for-bit holds per request, not across batchings.
    reward = make_reward("digit_alignment")
    local = torch.cat([reward(images[i : i + 4], prompts[i : i + 4]) for i in range(0, 10, 4)])
    assert remote.dtype == torch.float32 and torch.equal(remote, local)
    assert torch.allclose(remote, reward(images, prompts), rtol=1e-5, atol=1e-7)


def test_uint8_wire_scores_the_images_rounded_to_8_bits(served):
    images, prompts = digit_images(5)
    rounded = (images * 255).round() / 255
    remote = RemoteReward(served.url, wire_dtype="uint8")(images, prompts)
    assert torch.equal(remote, make_reward("digit_alignment")(rounded, prompts))


def test_binds_to_localhost_unless_told_otherwise(served):
    assert served.server_address[0] == "127.0.0.1"
    with urllib.request.urlopen(f"{served.url}/health", timeout=10) as answer:
        assert json.loads(answer.read())["reward"] == "digit_alignment"


@pytest.mark.parametrize(
    "body, status, reason",
    [
        (b"not a safetensors file", 400, "not a safetensors file"),
        (save_safetensors({"images": torch.zeros(2, 1, 8, 8, dtype=torch.float64)}, metadata={"prompts": '["1", "2"]'}), 400, "dtype"),
        (save_safetensors({"images": torch.zeros(2, 8, 8)}, metadata={"prompts": '["1", "2"]'}), 400, "shape"),
        (save_safetensors({"images": torch.zeros(2, 1, 8, 8)}, metadata={"prompts": '["1"]'}), 400, "prompts"),
        (save_safetensors({"images": torch.zeros(2, 1, 8, 8)}), 400, "prompts"),
        (encode_images(torch.zeros(65, 1, 8, 8), ["1"] * 65), 413, "limit of 64"),
        (encode_images(torch.zeros(64, 3, 64, 64), ["1"] * 64), 413, "limit of 1048576"),
    ],
    ids=["garbage", "float64", "3d", "prompt-count", "no-prompts", "batch", "bytes"],
)
def test_bad_payloads_get_4xx_with_the_reason(served, body, status, reason):
    code, answer = post(f"{served.url}/score", body)
    assert code == status and reason in answer["error"]


def test_unknown_path_and_token():
    server = RewardServer(make_reward("digit_alignment"), "digit_alignment", port=0, token="s3cret")
    server.start()
    try:
        images, prompts = digit_images(2)
        body = encode_images(images, prompts)
        assert post(f"{server.url}/nothing", body)[0] == 404
        code, answer = post(f"{server.url}/score", body)
        assert code == 401 and "token" in answer["error"]
        assert post(f"{server.url}/score", body, {"Authorization": "Bearer wrong"})[0] == 401
        good = RemoteReward(server.url, token="s3cret")(images, prompts)
        assert torch.equal(good, make_reward("digit_alignment")(images, prompts))
        with pytest.raises(RemoteRewardError, match="HTTP 401"):
            RemoteReward(server.url, retries=0)(images, prompts)  # 4xx fails at once, no retries
    finally:
        server.shutdown()
        server.server_close()


class _FlakyReward(Reward):
    """Fails its first ``failures`` calls (a 500 on the server), then scores the mean pixel."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def __call__(self, images, prompts):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("out of memory")
        return images.mean(dim=(1, 2, 3))


def test_5xx_is_retried_with_backoff_then_fails_with_one_line():
    reward = _FlakyReward(failures=1)
    server = RewardServer(reward, "flaky", port=0)
    server.start()
    try:
        images, prompts = digit_images(3)
        scores = RemoteReward(server.url, retries=1, backoff=0.01)(images, prompts)
        assert reward.calls == 2 and torch.equal(scores, images.mean(dim=(1, 2, 3)))
        reward.failures, reward.calls = 10, 0
        with pytest.raises(RemoteRewardError) as failed:
            RemoteReward(server.url, retries=2, backoff=0.01)(images, prompts)
        message = str(failed.value)
        assert reward.calls == 3 and "\n" not in message
        assert server.url in message and "HTTP 500" in message and "out of memory" in message and "3 attempts" in message
    finally:
        server.shutdown()
        server.server_close()


def test_a_dead_server_fails_within_the_configured_time_and_never_gives_zeros(served):
    images, prompts = digit_images(4)
    client = RemoteReward(served.url, timeout=1.0, retries=2, backoff=0.1)
    assert client(images, prompts).shape == (4,)
    served.shutdown()
    served.server_close()
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match=r"did not score a batch of 4.*3 attempts"):
        client(images, prompts)
    assert time.monotonic() - start < 3 * 1.0 + 0.1 + 0.2 + 1.0  # attempts x timeout + backoffs + slack


@pytest.mark.parametrize(
    "kwargs, key",
    [({"url": "127.0.0.1:8000"}, "url"), ({"timeout": 0}, "timeout"), ({"retries": -1}, "retries"),
     ({"batch_size": 0}, "batch_size"), ({"wire_dtype": "float16"}, "wire_dtype"), ({"backoff": float("nan")}, "backoff")],
)
def test_client_settings_are_checked_and_named(kwargs, key):
    with pytest.raises(ValueError, match=f"reward.kwargs.remote.{key}"):
        RemoteReward(**{"url": "http://127.0.0.1:1", **kwargs})


def test_serve_arguments():
    assert parse_reward_args(["reward=pickscore", "model=/m", "dtype=null", "scale=2.5"]) == (
        "pickscore", {"model": "/m", "dtype": None, "scale": 2.5})
    with pytest.raises(ValueError, match="reward=<name>"):
        parse_reward_args(["model=/m"])
    with pytest.raises(ValueError, match="key=value"):
        parse_reward_args(["digit_alignment"])
    with pytest.raises(ValueError, match="is the client"):
        parse_reward_args(["reward=remote"])


def _renamed(rows: list[dict]) -> list[dict]:
    """Rows with the served term ``.../remote`` named as the local term ``.../digit_alignment``."""
    renamed = []
    for row in comparable(rows):
        out = {k: v for k, v in row.items() if not k.endswith("/remote")}
        for key, value in row.items():
            if key.endswith("/remote"):
                local_key = key.replace("/remote", "/digit_alignment")
                assert out.get(local_key, value) == value  # the backend's own alignment metric agrees
                out[local_key] = value
        renamed.append(out)
    return renamed


def test_two_iterations_with_a_served_reward_equal_the_local_run(served, tmp_path):
    size = ["trainer.iterations=2", "logger.sample_grid=false", "logger.report=false"]
    local = Trainer(run_config("flow_dppo", *size, "reward=digits"), tmp_path / "local", progress=False).train()
    remote = Trainer(
        run_config("flow_dppo", *size, "reward=remote", f"reward.kwargs.remote.url={served.url}"), tmp_path / "remote", progress=False
    ).train()
    assert "reward/remote" in remote[-1] and "eval/train/reward" in remote[-1]
    assert _renamed(remote) == comparable(local)


def test_a_run_whose_server_dies_ends_with_the_clear_error_in_time(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "flowgym.rewards.serve", "reward=digit_alignment", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        assert "serving reward 'digit_alignment'" in server.stdout.readline()
        run = subprocess.Popen(
            [sys.executable, "-m", "algos.run", "algo=flow_dppo", "reward=remote", f"reward.kwargs.remote.url=http://127.0.0.1:{port}",
             "reward.kwargs.remote.timeout=2", "reward.kwargs.remote.retries=1", "reward.kwargs.remote.backoff=0.5",
             "trainer.iterations=1000", "trainer.eval_every=0", "trainer.checkpoint_every=0", "env.num_prompts=2", "env.group_size=4",
             "logger.backends=[csv]", "logger.sample_grid=false", "logger.report=false", "device=cpu", f"hydra.run.dir={tmp_path}/run"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, run.communicate()[1][-2000:]
        server.send_signal(signal.SIGKILL)
        server.wait()
        killed = time.monotonic()
        _, err = run.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        for process in (server, locals().get("run")):
            if process is not None and process.poll() is None:
                process.kill()
    assert run.returncode != 0
    assert f"reward server http://127.0.0.1:{port} did not score a batch" in err and "2 attempts" in err
    # 2 attempts x 2 s timeout + 0.5 s backoff, plus one iteration's compute in flight and the exit
    assert took < 2 * 2 + 0.5 + 15, took
