"""The parked tool's benchmark runs end to end at toy size and leaves no queue behind."""

from __future__ import annotations

import pika
import pytest
from pydantic import SecretStr

from app.settings import load_settings
from bench import parked_tool
from tests.integration.services import RabbitService


def test_the_parked_tool_bench_runs_and_cleans_up(
    rabbit: RabbitService, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings().model_copy(
        update={
            "rabbitmq_host": rabbit.host,
            "rabbitmq_port": rabbit.port,
            "rabbitmq_user": rabbit.user,
            "rabbitmq_pass": SecretStr(rabbit.password),
            "rabbitmq_vhost": rabbit.vhost,
        }
    )
    made: list[parked_tool.Bench] = []
    original = parked_tool.Bench

    def recording(*args: object, **kwargs: object) -> parked_tool.Bench:
        made.append(original(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(parked_tool, "Bench", recording)
    results = parked_tool.run(settings, count=20, rounds=1)
    assert results["messages"] == 20
    assert set(results["messages_per_second"]) == {
        "floor_publish",
        "floor_get",
        "tool_list",
        "tool_replay",
        "tool_purge",
    }
    assert all(rate > 0 for rate in results["messages_per_second"].values())
    assert all(ratio > 0 for ratio in results["ratios"].values())
    assert len(made) == 1
    bench = made[0]
    parameters = pika.ConnectionParameters(
        rabbit.host, rabbit.port, rabbit.vhost, pika.PlainCredentials(rabbit.user, rabbit.password)
    )
    with pika.BlockingConnection(parameters) as connection:
        for name in (bench.queues.name, bench.queues.parked, bench.floor_queue):
            channel = connection.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # 404: deleted
                channel.queue_declare(name, passive=True)
