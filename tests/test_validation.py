"""Validation-error extraction and counting, without a network."""

from __future__ import annotations

import gzip

import orjson

from apitally_proxy.metering.validation import (
    MAX_ERROR_BODY,
    ValidationErrorCounter,
    extract_validation_errors,
)

JSON = "application/json"
FASTAPI_422 = orjson.dumps(
    {"detail": [{"loc": ["body", "items", 0, "qty"], "msg": "Field required", "type": "missing"}]}
)


def test_fastapi_loc_parts_become_strings():
    assert extract_validation_errors("fastapi", 422, JSON, None, FASTAPI_422) == [
        (("body", "items", "0", "qty"), "Field required", "missing")
    ]


def test_gzip_encoded_error_bodies_are_decoded():
    body = gzip.compress(FASTAPI_422)
    assert extract_validation_errors("starlette", 422, JSON, "gzip", body)


def test_wrong_status_or_content_type_yields_nothing():
    assert extract_validation_errors("fastapi", 400, JSON, None, FASTAPI_422) == []
    assert extract_validation_errors("fastapi", 422, "text/plain", None, FASTAPI_422) == []
    assert extract_validation_errors("flask", 422, JSON, None, FASTAPI_422) == []
    assert extract_validation_errors("none", 422, JSON, None, FASTAPI_422) == []


def test_malformed_bodies_yield_nothing():
    for body in (
        b"{",
        b"\xff\xfe not utf-8",
        b"[]",
        b'{"detail": "nope"}',
        b'{"detail": [1, "x", null, {"loc": 5, "msg": "m", "type": "t"}]}',
        b'{"detail": [{"loc": ["a"], "msg": {"x": 1}, "type": "t"}]}',
        b"[" * 5000,
    ):
        assert extract_validation_errors("auto", 422, JSON, None, body) == []
        assert extract_validation_errors("auto", 400, JSON, None, body) == []


def test_oversized_bodies_yield_nothing():
    detail = [{"loc": ["body", "x"], "msg": "m" * 100, "type": "t"}] * 450
    body = orjson.dumps({"detail": detail})
    assert 50_000 < len(body) < MAX_ERROR_BODY
    # The official Starlette client keeps no more than 50,000 bytes of a body.
    assert extract_validation_errors("fastapi", 422, JSON, None, body) == []


def test_gzip_bomb_is_bounded():
    bomb = gzip.compress(b'{"detail": [' + b" " * 50_000_000 + b"]}")
    assert len(bomb) < MAX_ERROR_BODY
    assert extract_validation_errors("fastapi", 422, JSON, "gzip", bomb) == []


def test_litestar_extra_maps_source_and_dotted_key():
    body = orjson.dumps(
        {
            "status_code": 400,
            "detail": "Validation failed for POST /x",
            "extra": [
                {"key": "a.b", "message": "bad", "source": "query"},
                {"key": "c", "message": "worse"},
                {"message": "no key"},
            ],
        }
    )
    assert extract_validation_errors("litestar", 400, JSON, None, body) == [
        (("query", "a", "b"), "bad", ""),
        (("body", "c"), "worse", ""),
    ]
    big = body[:-1] + b', "pad": "' + b"p" * 4096 + b'"}'
    assert extract_validation_errors("litestar", 400, JSON, None, big) == []


def test_fastify_message_is_split_per_located_error():
    body = orjson.dumps(
        {
            "statusCode": 400,
            "code": "FST_ERR_VALIDATION",
            "message": "body/name must be string, querystring.limit must be integer, params/id x",
        }
    )
    assert extract_validation_errors("fastify", 400, JSON, None, body) == [
        (("body", "name"), "body/name must be string", ""),
        (("query", "limit"), "querystring.limit must be integer", ""),
        (("params", "id"), "params/id x", ""),
    ]
    other = orjson.dumps({"code": "FST_ERR_CTP_INVALID_MEDIA_TYPE", "message": "body/x y"})
    assert extract_validation_errors("fastify", 400, JSON, None, other) == []


def test_auto_detects_each_shape():
    litestar = orjson.dumps(
        {"detail": "Validation failed", "extra": [{"key": "k", "message": "m"}]}
    )
    fastify = orjson.dumps({"message": "body/k must be string"})
    assert extract_validation_errors("auto", 422, JSON, None, FASTAPI_422)[0][2] == "missing"
    assert extract_validation_errors("auto", 400, JSON, None, litestar) == [
        (("body", "k"), "m", "")
    ]
    assert extract_validation_errors("auto", 400, JSON, None, fastify)[0][0] == ("body", "k")


def test_counter_aggregates_by_full_key_and_is_bounded():
    c = ValidationErrorCounter(max_keys=2)
    err = [(("body", "a"), "m", "t")]
    c.add_validation_errors("c1", "post", "/x", err)
    c.add_validation_errors("c1", "POST", "/x", err)
    c.add_validation_errors(None, "POST", "/x", err)
    c.add_validation_errors(None, "POST", "/y", err)  # a third key: over the cap
    assert c.overflow == 1
    assert c.peek_validation_errors() == c.get_and_reset_validation_errors()
    assert c.get_and_reset_validation_errors() == []
