"""The aggregates the hub wants: pure, synchronous, no I/O."""

from apitally_proxy.metering.consumers import Consumer, ConsumerRegistry, parse_consumer
from apitally_proxy.metering.meter import Meter
from apitally_proxy.metering.requests import RequestCounter

__all__ = ["Consumer", "ConsumerRegistry", "Meter", "RequestCounter", "parse_consumer"]
