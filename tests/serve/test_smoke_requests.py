"""smoke-test's requests: up to smoke_test.concurrency at once against vLLM (which batches them),
answers kept in the order asked, the first failure raised; one at a time where asked so."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from ftpipe.serve.smoke_test import _ask_all


class Client:
    """An OpenAI client's `chat.completions.create` that answers the prompt back, slowly, counting
    the requests in flight; the prompt "boom" fails."""

    def __init__(self) -> None:
        self.in_flight = self.most = 0
        self.lock = threading.Lock()
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, model, messages, max_tokens, temperature):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(0.05)
            text = messages[-1]["content"]
            if text == "boom":
                raise RuntimeError("HTTP 500")
            choice = SimpleNamespace(message=SimpleNamespace(content=f"{model}:{text}"), finish_reason="stop")
            return SimpleNamespace(choices=[choice])
        finally:
            with self.lock:
                self.in_flight -= 1


def chats(*texts: str) -> list:
    return [[{"role": "user", "content": t}] for t in texts]


@pytest.mark.parametrize("in_flight, most", [(4, 4), (1, 1)])
def test_answers_come_back_in_order_with_at_most_in_flight_requests(in_flight: int, most: int) -> None:
    client = Client()
    texts = [str(i) for i in range(10)]
    assert _ask_all(client, "m", chats(*texts), 8, in_flight) == [(f"m:{t}", "stop") for t in texts]
    assert client.most == most


def test_the_first_failed_request_is_raised() -> None:
    with pytest.raises(RuntimeError, match="HTTP 500"):
        _ask_all(Client(), "m", chats("a", "boom", "c", "boom"), 8, 4)
