"""The migration path for dead-letter queues left by an older workerkit, on a private node.

Such a DLQ has no delivery limit and cannot be re-declared with one; docs/brokers.md tells the
operator to protect it with a policy. This proves the policy does it on the version under test.
"""

from __future__ import annotations

import uuid

import pika
from broker import PrivateBroker

from workerkit.topology import DEAD_LETTER_DELIVERY_LIMIT


def nack_head(url: str, queue: str) -> bool:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        method, _props, _body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return False
        channel.basic_nack(method.delivery_tag, requeue=True)
        channel.close()
        return True
    finally:
        conn.close()


def test_the_documented_policy_protects_an_old_dlq(private_broker: PrivateBroker) -> None:
    queue = f"t.olddlq.{uuid.uuid4().hex[:8]}.dlq"
    policy = f"wk-test-{uuid.uuid4().hex[:8]}"
    url = private_broker.url
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.basic_publish("", queue, b"dead letter")
    finally:
        conn.close()
    # The command docs/brokers.md gives, narrowed to this queue's name.
    private_broker.ctl(
        "set_policy",
        "--apply-to",
        "queues",
        policy,
        f"^{queue.replace('.', '[.]')}$",
        f'{{"delivery-limit": {DEAD_LETTER_DELIVERY_LIMIT}}}',
    )
    try:
        for _ in range(25):  # more than 4.0's default limit of 20
            assert nack_head(url, queue), "the dead letter was dropped"
    finally:
        private_broker.ctl("clear_policy", policy, check=False)
        conn = pika.BlockingConnection(pika.URLParameters(url))
        conn.channel().queue_delete(queue)
        conn.close()
