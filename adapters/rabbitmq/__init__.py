"""The TaskSource on RabbitMQ (pika): the backend's queue, retry-delay queues, a parked queue."""

from adapters.rabbitmq.task_source import BrokerUnavailable, RabbitMQTaskSource, retry_ladder

__all__ = ["BrokerUnavailable", "RabbitMQTaskSource", "retry_ladder"]
