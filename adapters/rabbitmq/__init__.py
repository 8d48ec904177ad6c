"""The TaskSource on RabbitMQ (pika): the backend's queue, retry-delay queues, a parked queue.

``RabbitMQTaskSource`` (``task_source``) is the adapter; its parts, each on one seam:

- ``connection``: the I/O thread: connects, consumes, sets the hold, reconnects, closes;
- ``inbox``: the deliveries between the I/O thread and the caller, the hold, the epochs;
- ``settling``: ack, release, and the confirmed copies of retry and park;
- ``queues``: the queues' names, the retry ladder, their declaration;
- ``delivery_headers``: the worker's headers, read from a delivery and written on a copy;
- ``header_codec``: headers pika cannot decode or encode.

Nothing a message carries may stop it reaching intake: a message the broker keeps redelivering
at the head of the queue would starve every consumer. Every module logs as ``adapters.rabbitmq``.
"""

from adapters.rabbitmq.connection import BrokerUnavailable
from adapters.rabbitmq.queues import retry_ladder
from adapters.rabbitmq.task_source import RabbitMQTaskSource

__all__ = ["BrokerUnavailable", "RabbitMQTaskSource", "retry_ladder"]
