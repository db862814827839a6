"""The framework registry (apitally_proxy/frameworks.py): one record per framework.

The modules that act on per-framework facts read them from the registry; these
tests hold the registry together (every name it hands out means something to the
modules that read it) and pin the translation of the `framework` setting.
"""

from __future__ import annotations

import pytest

from apitally_proxy import frameworks
from apitally_proxy.config import FRAMEWORKS, load_settings
from apitally_proxy.metering.validation import PARSERS, readers
from apitally_proxy.openapi import PROBE_PATHS, detect_framework
from apitally_proxy.routes import MatchRules, parse_template, paths_method, spell


def test_every_record_is_filed_under_its_name_and_the_settings_offer_them_all():
    assert all(name == f.name for name, f in frameworks.FRAMEWORKS.items())
    assert FRAMEWORKS == frameworks.NAMES
    assert set(frameworks.SETTING_VALUES) == {"auto", "none", *frameworks.NAMES}


@pytest.mark.parametrize("framework", list(frameworks.FRAMEWORKS.values()), ids=str)
def test_a_record_names_only_what_the_modules_know(framework: frameworks.Framework):
    assert framework.client_tag.split(":")[0] in ("python", "js")
    if framework.validation is not None:
        assert framework.validation.parser in PARSERS
        assert framework.validation.statuses <= frameworks.VALIDATION_STATUSES
    for probe in framework.probes:
        assert probe.path.startswith("/")
    assert load_settings({"upstream": "http://a:1", "framework": framework.name}).framework == (
        framework.name
    )


def test_the_settings_words_auto_and_none_are_read_in_one_place():
    assert frameworks.from_setting("auto") == frameworks.Choice(None, guess=True)
    assert frameworks.from_setting("none") == frameworks.Choice(None, guess=False)
    fastify = frameworks.from_setting("fastify")
    assert (fastify.framework, fastify.guess, fastify.name) == (
        frameworks.FRAMEWORKS["fastify"],
        False,
        "fastify",
    )
    with pytest.raises(ValueError, match="unknown framework 'rails'"):
        frameworks.from_setting("rails")
    # Unknown is None everywhere inside: lookups of None (or of a settings word) find nothing.
    assert frameworks.get(None) is None and frameworks.get("auto") is None
    assert MatchRules.for_framework(None) == frameworks.UNKNOWN_RULES


def test_validation_readers_unknown_guesses_every_shape_none_reads_nothing():
    assert readers("auto") == readers(None) == frameworks.EVERY_VALIDATION
    assert readers("none") == readers(None, guess=False) == ()
    assert readers("flask") == ()  # the official Flask client extracts no validation errors
    assert readers("fastapi") == readers("starlette")  # one Starlette middleware
    # Registry order, each shape once.
    assert len(set(frameworks.EVERY_VALIDATION)) == len(frameworks.EVERY_VALIDATION)


def test_the_probe_order_is_the_one_design_md_gives():
    assert PROBE_PATHS == (
        ("/openapi.json", None),
        ("/schema/openapi.json", "litestar"),
        ("/openapi/openapi.json", "flask"),
        ("/documentation/json", "fastify"),
        ("/apispec_1.json", "flask"),
        ("/schema", "starlette"),
    )
    # A framework that is set explicitly keeps the same order unless it has unranked probes.
    assert frameworks.probe_paths("litestar") == PROBE_PATHS


@pytest.mark.parametrize(
    ("doc", "hint", "expected"),
    [
        ({"components": {"schemas": {"HTTPValidationError": {}}}}, None, "fastapi"),
        ({"info": {"title": "Litestar API"}}, "flask", "litestar"),
        ({"info": {"title": ["not", "a", "string"]}}, "flask", "flask"),
        ({"components": ["not", "an", "object"]}, None, None),
    ],
)
def test_detection_reads_the_document_before_the_location(doc, hint, expected):
    assert detect_framework(doc, hint) == expected


@pytest.mark.parametrize(
    ("framework", "spelled", "method"),
    [
        ("starlette", "/f/{rest:path}/{id}/{n}", "get"),
        ("fastapi", "/f/{rest:path}/{id}/{n}", "get"),
        ("flask", "/f/<path:rest>/<int:id>/<n>", "GET"),
        ("litestar", "/f/{rest:path}/{id:int}/{n:str}", "GET"),
        ("fastify", "/f/:rest/:id/:n", "GET"),
        (None, "/f/{rest}/{id}/{n}", "GET"),
    ],
)
def test_each_framework_spells_templates_and_paths_its_way(framework, spelled, method):
    segments = parse_template("/f/{rest:path}/{id:int}/{n}")
    assert spell(segments, framework) == spelled
    assert paths_method("GET", framework) == method


def test_litestar_templates_lose_their_types_for_apitally_1x():
    litestar = frameworks.FRAMEWORKS["litestar"]
    segments = parse_template("/items/{id:int}")
    assert spell(segments, litestar.template_spelling()) == "/items/{id:int}"
    assert spell(segments, litestar.template_spelling(otlp=True)) == "/items/{id}"
