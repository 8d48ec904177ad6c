"""How fast `python -m app parked` reads, replays and purges, beside the broker's floor.

Every move the tool makes is the safe one: a replay is published with publisher confirms and
acked in the parked queue only after its confirm, one message at a time; a read holds the
messages unacked. The floor, measured in the same run on the same broker, is the plainest loop
that is as safe: publish one message and wait for its confirm, then the next (the rate a replay
cannot beat), and ``basic.get`` without ack (the rate a read cannot beat). Ratios to that floor
are what this machine can tell; the absolute rates depend on the broker's disk.

Parks ``--messages`` backend-shaped messages (about 700 bytes, the worker's park headers) in a
queue of its own, then measures, in rounds, interleaved: the floor's confirmed publish and its
unacked gets, the tool's ``scan`` (``list``), ``replay`` of every message, ``purge`` of every
message. Deletes its queues. Writes bench/results/parked_tool.json.

    .venv/bin/python -m bench.parked_tool                 # 2000 messages, 3 rounds
    .venv/bin/python -m bench.parked_tool --smoke         # 20 messages, 1 round (the test)

The broker comes from the worker's settings (``RABBITMQ_HOST`` and so on; the local one by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pika

from adapters.rabbitmq.queues import Queues
from app.parked_command import parked_queue
from app.settings import Settings, load_settings

RESULTS = Path(__file__).parent / "results" / "parked_tool.json"


def message(number: int) -> bytes:
    """A message as the backend publishes it, about 700 bytes."""
    return json.dumps(
        {
            "task_id": str(uuid.UUID(int=number)),
            "type": "image_generation",
            "data": {
                "generation_id": 1_000_000 + number,
                "style_id": 123,
                "lora_path": "s3://stylelicense-models/styles/123/",
                "prompt": "watercolor, portrait, vintage, " + "soft light, " * 20,
                "aspect_ratio": "1:1",
                "seed": number,
                "signature_path": "s3://stylelicense-media/signatures/77.png",
                "signature_config": {"position": "bottom-right", "size": "medium", "opacity": 0.7},
                "prompt_tags": ["watercolor", "portrait", "vintage"],
            },
            "webhook_url": "https://api.example.com/api/webhooks/generation/1/status",
        }
    ).encode()


def park_headers(queue: str) -> dict[str, Any]:
    """Headers as the worker writes them on a parked copy."""
    return {
        "x-park-reason": "INVALID_REQUEST: data.prompt must be a string",
        "x-parked-at": datetime.now(timezone.utc).isoformat(),
        "x-original-queue": queue,
        "x-retry-count": 0,
        "x-handback-count": 0,
        "x-decided-outcome": json.dumps({"kind": "failed", "error_code": "INVALID_REQUEST"}),
    }


class Bench:
    """One broker connection with confirms, and the tool's adapter, on queues of its own."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.count = count
        self.queues = Queues(f"bench_parked_{uuid.uuid4().hex[:8]}", (1,))  # names only
        self.floor_queue = f"{self.queues.name}.floor"
        self.tool = parked_queue(
            settings.model_copy(
                update={"rabbitmq_queue": self.queues.name, "rabbitmq_parked_max_messages": 0}
            ),
            timeout=30.0,
        )
        self.connection = pika.BlockingConnection(self.tool.parameters)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        for name in (self.queues.name, self.queues.parked, self.floor_queue):
            self.channel.queue_declare(name, durable=True)

    def publish(self, queue: str, headers: dict[str, Any] | None = None) -> None:
        """``count`` messages, each confirmed before the next (the floor of a safe move)."""
        for number in range(self.count):
            self.channel.basic_publish(
                "",
                queue,
                message(number),
                pika.BasicProperties(
                    delivery_mode=2, content_type="application/json", headers=headers
                ),
                mandatory=True,
            )

    def get_unacked(self, queue: str) -> None:
        """``basic.get`` every message without ack, then give them all back (the floor of a
        read)."""
        for _ in range(self.count):
            method, _, _ = self.channel.basic_get(queue, auto_ack=False)
            assert method is not None, "the floor queue ran dry"
        self.channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)

    def empty(self, queue: str) -> None:
        """Remove every message of ``queue``."""
        self.channel.queue_purge(queue)

    def tool_list(self) -> None:
        """What ``parked list --limit N`` does: scan every message, then give them back."""
        with self.tool as queue:
            assert len(queue.scan(self.count)) == self.count
            queue.release()

    def tool_replay(self) -> None:
        """What ``parked replay --all --yes`` does, without the process start."""
        with self.tool as queue:
            messages = queue.scan()
            assert len(messages) == self.count, f"{len(messages)} of {self.count} to replay"
            for parked in messages:
                queue.replay(parked)

    def tool_purge(self) -> None:
        """What ``parked purge --all --yes --discard`` does, without the process start."""
        with self.tool as queue:
            messages = queue.scan()
            assert len(messages) == self.count, f"{len(messages)} of {self.count} to purge"
            for parked in messages:
                queue.purge(parked)

    def settle(self, queue: str) -> None:
        """Wait until ``queue`` counts ``count`` ready messages: messages given back by a
        closing session reach the queue a moment after its connection is gone."""
        deadline = time.monotonic() + 30
        while self.channel.queue_declare(queue, passive=True).method.message_count != self.count:
            assert time.monotonic() < deadline, f"{queue} does not settle at {self.count}"
            time.sleep(0.05)

    def close(self) -> None:
        """Delete every queue of the bench, then disconnect."""
        for name in (self.queues.name, self.queues.parked, self.floor_queue):
            self.channel.queue_delete(name)
        self.connection.close()


def timed(step: Callable[[], None]) -> float:
    """Seconds ``step`` took."""
    began = time.perf_counter()
    step()
    return time.perf_counter() - began


def run(settings: Settings, count: int, rounds: int) -> dict[str, Any]:
    """The rates of each operation (messages per second, median of ``rounds``)."""
    bench = Bench(settings, count)
    seconds: dict[str, list[float]] = {
        name: []
        for name in ("floor_publish", "floor_get", "tool_list", "tool_replay", "tool_purge")
    }
    try:
        for _ in range(rounds):
            seconds["floor_publish"].append(timed(lambda: bench.publish(bench.floor_queue)))
            seconds["floor_get"].append(timed(lambda: bench.get_unacked(bench.floor_queue)))
            bench.empty(bench.floor_queue)
            bench.publish(bench.queues.parked, park_headers(bench.queues.name))
            seconds["tool_list"].append(timed(bench.tool_list))
            bench.settle(bench.queues.parked)
            seconds["tool_replay"].append(timed(bench.tool_replay))
            bench.settle(bench.queues.name)
            bench.empty(bench.queues.name)
            bench.publish(bench.queues.parked, park_headers(bench.queues.name))
            seconds["tool_purge"].append(timed(bench.tool_purge))
    finally:
        bench.close()
    rates = {name: count / statistics.median(values) for name, values in seconds.items()}
    return {
        "messages": count,
        "rounds": rounds,
        "messages_per_second": {name: round(rate, 1) for name, rate in rates.items()},
        "ratios": {
            "list_to_unacked_get": round(rates["tool_list"] / rates["floor_get"], 3),
            "replay_to_confirmed_publish": round(rates["tool_replay"] / rates["floor_publish"], 3),
            "purge_to_unacked_get": round(rates["tool_purge"] / rates["floor_get"], 3),
        },
    }


def main() -> None:
    """Parse, run, print, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="20 messages, 1 round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    count, rounds = (20, 1) if args.smoke else (args.messages, args.rounds)
    results = run(load_settings(), count, rounds)
    for name, rate in results["messages_per_second"].items():
        print(f"{name:>14}: {rate:10.1f} messages/s")
    for name, ratio in results["ratios"].items():
        print(f"{name:>28}: {ratio:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
