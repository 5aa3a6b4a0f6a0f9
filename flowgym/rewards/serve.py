"""Serve any registered reward over HTTP, so that heavy reward models run in their own environment.

    python -m flowgym.rewards.serve reward=<name> [key=value ...] [--port 8000] [--host 127.0.0.1]
        [--token SECRET] [--max-batch 256] [--max-mb 256] [--device cpu]

``key=value`` pairs are the reward's constructor arguments (values parsed as YAML: ``model=/path``,
``dtype=null``). The trainer reaches it with ``reward=remote`` (``flowgym.rewards.remote``); the wire
format is ``flowgym.rewards.wire`` (safetensors images in, JSON scores out, never pickles).

Endpoints: ``POST /score`` scores a batch; ``GET /health`` says which reward is served and the limits.
Errors are answered ``4xx`` with ``{"error": reason}``: 400 malformed payload, 401 missing or wrong
token, 404 unknown path, 411 no Content-Length, 413 body or batch over the limits; a reward that
raises gives 500 (the client retries those).

The server is the standard library's ``ThreadingHTTPServer``: no dependency beyond the reward's own
(the point of a reward server is a small, conflict-free install), and the work per request is one
batched forward, so a request-per-thread server is not the bottleneck. Requests are scored one at a
time under a lock: reward models on one device are not safe to call concurrently. It binds to
127.0.0.1 unless ``--host`` says otherwise; the token is compared in constant time.
"""

from __future__ import annotations

import argparse
import hmac
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

import torch

from flowgym.rewards.base import Reward, available_rewards, make_reward
from flowgym.rewards.wire import PayloadError, PayloadTooLarge, decode_images, encode_scores, images_as_float

__all__ = ["RewardServer", "main", "parse_reward_args"]

DEFAULT_HOST = "127.0.0.1"
#: an oversized body is read away up to this size before the 413 (beyond it the connection is cut)
_DRAIN_LIMIT = 2**30
_CHUNK = 2**16
#: seconds a request may take to arrive (a client that stalls mid-body does not hold a thread forever)
_REQUEST_TIMEOUT = 120


class RewardServer(ThreadingHTTPServer):
    """An HTTP server scoring image batches with one ``Reward``.

    ``RewardServer(reward, name, port=0)`` binds at once (port 0: any free port, read ``.port``);
    ``serve_forever()`` (or ``start()`` for a daemon thread) answers requests; ``shutdown()`` stops.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        reward: Reward,
        name: str,
        host: str = DEFAULT_HOST,
        port: int = 0,
        token: str | None = None,
        max_batch: int = 256,
        max_bytes: int = 256 * 2**20,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_batch < 1 or max_bytes < 1:
            raise ValueError(f"max_batch and max_bytes must be >= 1; got {max_batch} and {max_bytes}")
        self.reward, self.name, self.token = reward, name, token or None
        self.max_batch, self.max_bytes, self.device = max_batch, max_bytes, torch.device(device)
        self.lock = threading.Lock()
        self.reward.to(self.device)
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{host}:{self.port}"

    def start(self) -> threading.Thread:
        """Serve from a daemon thread (tests, notebooks); returns the thread."""
        thread = threading.Thread(target=self.serve_forever, name=f"reward-server-{self.port}", daemon=True)
        thread.start()
        return thread

    def score(self, body: bytes) -> bytes:
        """The response body for a ``/score`` request body (``PayloadError`` if it is malformed)."""
        images, prompts = decode_images(body, self.max_batch)
        with self.lock, torch.no_grad():
            scores = self.reward(images_as_float(images).to(self.device), prompts)
        scores = scores.detach().float().reshape(-1)
        if scores.numel() != len(prompts):
            raise RuntimeError(f"reward {self.name!r} returned {scores.numel()} scores for {len(prompts)} images")
        return encode_scores(self.name, scores)

    def health(self) -> bytes:
        return json.dumps({"reward": self.name, "max_batch": self.max_batch, "max_bytes": self.max_bytes}).encode()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"
    timeout = _REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # one line per request, on stderr
        sys.stderr.write(f"[reward-server] {self.address_string()} {format % args}\n")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, reason: str) -> None:
        self._answer(status, json.dumps({"error": reason}).encode())

    def _authorised(self) -> bool:
        if self.server.token is None:
            return True
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.server.token}"
        if hmac.compare_digest(given.encode(), expected.encode()):
            return True
        self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send the header 'Authorization: Bearer <token>'")
        return False

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._error(HTTPStatus.NOT_FOUND, f"unknown path {self.path!r}; GET /health or POST /score")
        if self._authorised():
            self._answer(HTTPStatus.OK, self.server.health())

    def do_POST(self) -> None:
        if self.path != "/score":
            self.close_connection = True
            return self._error(HTTPStatus.NOT_FOUND, f"unknown path {self.path!r}; POST /score or GET /health")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        size = int(length)
        if size > self.server.max_bytes:
            # read the body away (in pieces, never held) so that the client, still sending, gets the
            # answer instead of a broken pipe; a body beyond any reason is cut off with the connection
            if size <= _DRAIN_LIMIT:
                for remaining in range(size, 0, -_CHUNK):
                    self.rfile.read(min(_CHUNK, remaining))
            self.close_connection = True
            return self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"payload of {size} bytes is over this server's limit of {self.server.max_bytes}; send smaller batches",
            )
        body = self.rfile.read(size)
        if not self._authorised():
            return
        try:
            answer = self.server.score(body)
        except PayloadError as error:
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if isinstance(error, PayloadTooLarge) else HTTPStatus.BAD_REQUEST
            return self._error(status, str(error))
        except Exception as error:  # the reward itself failed: 500, which the client retries
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"reward {self.server.name!r} failed: {type(error).__name__}: {error}")
        self._answer(HTTPStatus.OK, answer)


def parse_reward_args(items: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """``(reward name, constructor kwargs)`` from ``["reward=<name>", "key=value", ...]`` (values as YAML)."""
    import yaml

    name, kwargs = None, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r} (for example reward=digit_alignment)")
        if key == "reward":
            name = value
        else:
            kwargs[key] = yaml.safe_load(value)
    if not name:
        raise ValueError("name the reward to serve: reward=<name>; accepted: " + ", ".join(available_rewards()))
    if name == "remote":
        raise ValueError("reward=remote is the client; serve the reward it stands for (accepted: " + ", ".join(available_rewards()) + ")")
    return name, kwargs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flowgym.rewards.serve", description="Serve a registered reward over HTTP.")
    parser.add_argument("settings", nargs="+", help="reward=<name>, then the reward's key=value arguments")
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 = any free port; the chosen one is printed)")
    parser.add_argument("--token", default=None, help="shared secret the client must send (reward.kwargs.remote.token)")
    parser.add_argument("--max-batch", type=int, default=256, help="most images per request")
    parser.add_argument("--max-mb", type=float, default=256.0, help="largest request body in MiB")
    parser.add_argument("--device", default="cpu", help="device the reward runs on (cpu, cuda, cuda:1, ...)")
    args = parser.parse_args(argv)
    try:
        name, kwargs = parse_reward_args(args.settings)
        reward = make_reward(name, **kwargs)
        server = RewardServer(
            reward, name, args.host, args.port, args.token, args.max_batch, int(args.max_mb * 2**20), args.device
        )
    except (ValueError, KeyError, OSError) as error:
        sys.exit(f"error: {error}")
    print(f"serving reward {name!r} at {server.url} (POST /score, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
