"""``reward=remote``: a reward scored by a reward server (``python -m flowgym.rewards.serve``).

The trainer uses it like any local reward. Each batch is sent in chunks of ``batch_size`` images
(safetensors, ``flowgym.rewards.wire``); a connection error, a timeout or a 5xx answer is retried
with exponential backoff (``backoff * 2**attempt`` seconds) up to ``retries`` times, then the run
fails with one line naming the url, what failed and how long it tried. A failed request never turns
into a zero reward. A 4xx answer (the request itself is wrong) fails at once with the server's reason.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from typing import Sequence

import torch
from torch import Tensor

from flowgym.rewards.base import Reward, check_reward_batch, register_reward
from flowgym.rewards.wire import decode_scores, encode_images

__all__ = ["RemoteReward", "RemoteRewardError"]

WIRE_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}


class RemoteRewardError(RuntimeError):
    """The reward server could not score a batch (the message names the url and what failed)."""


@register_reward("remote")
class RemoteReward(Reward):
    """Scores from a reward server at ``url`` (``http://127.0.0.1:8000``).

    Args:
        url: the server's base url; ``/score`` is appended.
        timeout: seconds one request may take (connect + answer).
        retries: further attempts after a failed one (connection errors, timeouts, 5xx only).
        backoff: seconds before the first retry; doubled at each further one.
        batch_size: most images per request (the server's ``--max-batch`` must allow it).
        token: the server's shared token, sent as ``Authorization: Bearer <token>``.
        wire_dtype: ``float32`` (bit-exact: the server scores exactly the local images) or ``uint8``
            (4x smaller; the images are rounded to 8 bits first, as a saved PNG would be).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 64,
        token: str | None = None,
        wire_dtype: str = "float32",
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"reward.kwargs.remote.url must be an http(s) url such as http://127.0.0.1:8000; got {url!r}")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"reward.kwargs.remote.timeout must be a finite number of seconds > 0; got {timeout!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"reward.kwargs.remote.retries must be an integer >= 0; got {retries!r}")
        if not (isinstance(backoff, (int, float)) and math.isfinite(backoff) and backoff >= 0):
            raise ValueError(f"reward.kwargs.remote.backoff must be a finite number of seconds >= 0; got {backoff!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"reward.kwargs.remote.batch_size must be an integer >= 1; got {batch_size!r}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"reward.kwargs.remote.wire_dtype must be one of {sorted(WIRE_DTYPES)}; got {wire_dtype!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.batch_size = float(timeout), retries, float(backoff), batch_size
        self.token, self.wire_dtype = token or None, WIRE_DTYPES[wire_dtype]

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_batch(images, prompts)
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            part = images[start : start + self.batch_size]
            chunks.append(self._score(self._wire(part), list(prompts[start : start + self.batch_size])))
        return torch.cat(chunks).to(images.device)

    def _wire(self, images: Tensor) -> Tensor:
        images = images.detach().float().cpu()
        if self.wire_dtype == torch.uint8:
            return (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return images

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        body = encode_images(images, prompts)
        headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        start, failure = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{self.url}/score", data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return decode_scores(answer.read(), len(prompts))
            except urllib.error.HTTPError as error:
                reason = _reason(error)
                if error.code < 500:  # the request is wrong: retrying cannot help
                    raise RemoteRewardError(f"reward server {self.url} refused the batch: HTTP {error.code}: {reason}") from None
                failure = f"HTTP {error.code}: {reason}"
            except (urllib.error.URLError, OSError) as error:  # refused, reset, timed out
                failure = str(getattr(error, "reason", error))
        elapsed = time.monotonic() - start
        raise RemoteRewardError(
            f"reward server {self.url} did not score a batch of {len(prompts)}: {failure} "
            f"({self.retries + 1} attempts over {elapsed:.1f} s; is `python -m flowgym.rewards.serve` running there?)"
        )


def _reason(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(error.reason)
