"""Every LeadStream Kafka client connects the way the Kafka security settings say: a worker and a sink
over the local broker's SASL listener, and a wrong password refused with a clear error."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from aiokafka.errors import KafkaError

from leadstream.runner import Role, produce, wait_for
from leadstream.stack import LOCAL_SASL_PASSWORD, LOCAL_SASL_USER, local_sasl_port
from leadstream.topics import ensure_topics
from tests.integration.test_ingest import valid_events

pytestmark = pytest.mark.integration


def over_sasl(settings, password: str = LOCAL_SASL_PASSWORD):
    return replace(settings, kafka_bootstrap=f"127.0.0.1:{local_sasl_port(settings)}",
                   kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                   kafka_sasl_username=LOCAL_SASL_USER, kafka_sasl_password=password)


def test_worker_and_sink_work_over_sasl(settings, roles):
    secured = over_sasl(settings)
    assert asyncio.run(ensure_topics(secured.kafka(), verbose=False))  # the admin client authenticates
    roles += [Role(secured, "worker", "worker", "--processors", "raw").start(),
              Role(secured, "sink", "sink", "--tables", "events,dlq").start()]
    asyncio.run(produce(secured, valid_events(200, site="sasl")))
    wait_for(secured, "SELECT count() FROM events WHERE site_id = 'sasl'", 200, 120, roles)


def test_a_wrong_password_is_refused(stack_settings, caplog):
    """aiokafka raises a generic bootstrap error; the broker's reason is in its log."""
    wrong = over_sasl(stack_settings, password="not-the-password")
    with pytest.raises(KafkaError, match="Unable to bootstrap"):
        asyncio.run(asyncio.wait_for(ensure_topics(wrong.kafka(), verbose=False), 60))
    assert "Authentication failed: Invalid username or password" in caplog.text
