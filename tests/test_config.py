"""Settings: every Kafka client gets the same connection options from one place."""

from __future__ import annotations

import ssl

import pytest

from processors.app import faust_credentials
from schemas.settings import KafkaSecurity, Settings


def test_plaintext_by_default():
    kafka = Settings().kafka()
    assert kafka.client_options() == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert faust_credentials(kafka.security) is None


def test_sasl_over_tls_reaches_aiokafka_librdkafka_and_faust():
    security = KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", "ls", "secret")
    options = security.aiokafka_options()
    assert options["sasl_mechanism"] == "SCRAM-SHA-512" and options["sasl_plain_username"] == "ls"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert security.librdkafka_options() == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                                             "sasl.username": "ls", "sasl.password": "secret"}
    credentials = faust_credentials(security)
    assert credentials.username == "ls" and credentials.protocol.value == "SASL_SSL"
    assert "secret" not in repr(security)


@pytest.mark.parametrize("protocol, mechanism", [("SASL", "PLAIN"), ("SASL_SSL", "GSSAPI")])
def test_unknown_protocols_and_mechanisms_are_refused_by_name(protocol, mechanism):
    with pytest.raises(ValueError, match="LEADSTREAM_KAFKA_"):
        KafkaSecurity(protocol, mechanism)
