"""The aggregates, exactly as the hub expects them; no network."""

from apitally_proxy.metering import ConsumerRegistry, RequestCounter, parse_consumer
from apitally_proxy.metering.consumers import ConsumerCache


def rows_by_key(counter: RequestCounter) -> dict:
    return {
        (r["consumer"], r["method"], r["path"], r["status_code"]): r
        for r in counter.get_and_reset_requests()
    }


def test_requests_are_aggregated_by_consumer_method_path_status():
    c = RequestCounter()
    for _ in range(3):
        c.add_request("a", "get", "/items/{id}", 200, 0.005, 0, 100)
    c.add_request("a", "GET", "/items/{id}", 404, 0.005, 0, 10)
    c.add_request(None, "GET", "/items/{id}", 200, 0.005, 0, 10)
    rows = rows_by_key(c)
    assert rows[("a", "GET", "/items/{id}", 200)]["request_count"] == 3
    assert rows[("a", "GET", "/items/{id}", 404)]["request_count"] == 1
    assert rows[(None, "GET", "/items/{id}", 200)]["request_count"] == 1


def test_response_time_bins_are_10ms_floors_like_the_official_client():
    c = RequestCounter()
    for t in (0.0, 0.0099, 0.01, 0.019, 0.29, 0.1234, 2.5):
        c.add_request(None, "GET", "/", 200, t)
    (row,) = c.get_and_reset_requests()
    # 0.29 / 0.01 == 28.999999999999996 in floats: the official client bins 290 ms as 280.
    assert row["response_times"] == {"0": 2, "10": 2, "280": 1, "120": 1, "2500": 1}


def test_size_bins_are_kilobytes_rounded_down_and_sums_are_raw_bytes():
    c = RequestCounter()
    c.add_request(None, "POST", "/", 201, 0.0, 999, 1000)
    c.add_request(None, "POST", "/", 201, 0.0, 2500, 0)
    (row,) = c.get_and_reset_requests()
    assert row["request_size_sum"] == 3499
    assert row["response_size_sum"] == 1000
    assert row["request_sizes"] == {"0": 1, "2": 1}
    assert row["response_sizes"] == {"1": 1, "0": 1}


def test_unknown_or_negative_sizes_are_not_recorded():
    c = RequestCounter()
    c.add_request(None, "GET", "/", 200, 0.0, None, -1)
    (row,) = c.get_and_reset_requests()
    assert row["request_sizes"] == {} and row["response_sizes"] == {}
    assert row["request_size_sum"] == 0 and row["response_size_sum"] == 0


def test_options_requests_are_not_counted():
    c = RequestCounter()
    c.add_request(None, "OPTIONS", "/", 204, 0.0)
    assert c.get_and_reset_requests() == []


def test_get_and_reset_starts_a_new_interval():
    c = RequestCounter()
    c.add_request(None, "GET", "/", 200, 0.0)
    assert len(c.get_and_reset_requests()) == 1
    assert c.get_and_reset_requests() == []


def test_distinct_consumers_per_interval_are_capped():
    c = RequestCounter(max_consumers=2)
    for ident in ("a", "b", "c", "d", "a"):
        c.add_request(ident, "GET", "/", 200, 0.0)
    rows = rows_by_key(c)
    assert rows[("a", "GET", "/", 200)]["request_count"] == 2
    assert rows[(None, "GET", "/", 200)]["request_count"] == 2
    assert c.consumer_overflow == 2


def test_consumer_values_are_stripped_truncated_and_percent_decoded():
    consumer = parse_consumer("  " + "x" * 200, " M%C3%BCller GmbH ", "g" * 100)
    assert consumer is not None
    assert consumer.identifier == "x" * 128
    assert consumer.name == "Müller GmbH"
    assert consumer.group == "g" * 64


def test_blank_consumer_identifier_means_no_consumer():
    assert parse_consumer("   ") is None
    assert parse_consumer(None, "name") is None


def test_invalid_percent_encoding_does_not_raise():
    consumer = parse_consumer("abc%ZZ%C3")
    assert consumer is not None and consumer.identifier.startswith("abc%ZZ")


def test_the_consumer_cache_answers_as_parse_consumer_and_stays_bounded():
    cache = ConsumerCache(size=4)
    cases = [
        ("  acme ", " M%C3%BCller ", None),
        ("acme", "Acme", "Pro"),
        ("   ", "name", None),  # no consumer: remembered as such
        (None, None, None),
        ("abc%ZZ%C3", None, "g" * 100),
    ]
    for _ in range(2):  # first parsed, then remembered (past size: parsed afresh)
        for values in cases:
            assert cache.parse(*values) == parse_consumer(*values)
    assert len(cache._seen) <= 4
    # Long values are parsed every time, never pinned in the cache.
    long = ("k" * 600, None, None)
    assert cache.parse(*long) == parse_consumer(*long)
    assert long not in cache._seen


def test_consumers_with_name_or_group_are_reported_once_and_again_on_change():
    reg = ConsumerRegistry()
    reg.add_or_update(parse_consumer("a", "Acme", "Pro"))
    reg.add_or_update(parse_consumer("a", "Acme", "Pro"))
    reg.add_or_update(parse_consumer("b"))  # no name or group: never listed
    assert reg.get_and_reset_updated_consumers() == [
        {"identifier": "a", "name": "Acme", "group": "Pro"}
    ]
    reg.add_or_update(parse_consumer("a", "Acme", "Pro"))
    assert reg.get_and_reset_updated_consumers() == []
    reg.add_or_update(parse_consumer("a", "Acme", "Enterprise"))
    assert reg.get_and_reset_updated_consumers() == [
        {"identifier": "a", "name": "Acme", "group": "Enterprise"}
    ]


def test_consumer_registry_is_bounded():
    reg = ConsumerRegistry(max_size=10)
    for i in range(1000):
        reg.add_or_update(parse_consumer(f"c{i}", "n"))
    assert len(reg.get_and_reset_updated_consumers()) == 10


async def test_a_serialized_peek_is_the_json_of_the_plain_one():
    """Checkpoints encode the rows a chunk at a time (no dict per row), the request rows
    on the loop when built: the same JSON, across chunk boundaries, repairs included;
    the counters are left as they were."""
    import orjson

    from apitally_proxy.hub.payloads import sync_payload
    from apitally_proxy.metering.meter import Meter
    from apitally_proxy.routes import RouteResolver
    from apitally_proxy.text import dumps_lenient

    meter = Meter(RouteResolver())
    for i in range(700):  # several chunks
        meter.requests.add_request(f"c{i % 300}", "GET", f"/p/{i % 7}", 200, i / 1000, i, 3 * i)
    meter.requests.add_request("caf\udce9", "POST", "/x", 201, 0.2)  # repaired, not dropped
    meter.validation_errors.add_validation_errors(
        None, "POST", "/x", [(("body", "name"), "field required", "missing")]
    )

    def encoded(aggregates: dict) -> dict:
        return orjson.loads(dumps_lenient(sync_payload("i", aggregates, None, "m"))[0])

    async def built(aggregates: dict) -> dict:
        for key, value in aggregates.items():
            if hasattr(value, "build"):
                aggregates[key] = await value.build()
        return aggregates

    plain, serialized = encoded(meter.peek()), encoded(await built(meter.peek(serialized=True)))
    plain.pop("timestamp"), serialized.pop("timestamp")
    assert serialized == plain
    assert len(plain["requests"]) == 701 and len(plain["validation_errors"]) == 1
    live = meter.peek(serialized=True)
    meter.requests.add_request("late", "GET", "/p/0", 200, 0.1)  # after the keys were listed
    assert encoded(await built(live))["requests"] == plain["requests"]
    assert len(meter.get_and_reset()["requests"]) == 702
    empty = await built(meter.peek(serialized=True))
    assert empty["requests"] == [] and empty["validation_errors"] == []


async def test_a_checkpoints_request_rows_are_made_on_the_loop_a_chunk_at_a_time():
    import asyncio
    import time

    import orjson

    from apitally_proxy.aio import Pause
    from apitally_proxy.metering.meter import Meter
    from apitally_proxy.routes import RouteResolver

    meter = Meter(RouteResolver())
    for i in range(1000):
        meter.requests.add_request(f"c{i}", "GET", "/p", 200, 0.01)
    live = meter.peek(serialized=True)["requests"]
    ran: list[str] = []
    loop = asyncio.get_running_loop()
    loop.call_soon(ran.append, "a request")
    loop.call_soon(time.sleep, 0.05)  # a request that takes 50 ms meanwhile
    pause = Pause()
    rows = await live.build(None, pause)
    assert ran == ["a request"]  # the loop ran in between chunks
    assert pause.away >= 0.05  # and that time is not the checkpoint's own cost
    assert len(orjson.loads(orjson.dumps(rows))) == 1000
