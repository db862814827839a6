"""Every framework the proxy knows: one frozen record each, in one registry.

What the official Apitally client of a framework does, and the proxy must do the
same way, is written here and nowhere else: the client tag it announces, how its
router matches paths, how it spells route templates and startup `paths`, where
its OpenAPI document lives and how the document gives it away, and which error
responses it reads validation errors from. The modules that act on these facts
(routes, openapi, metering.validation, capture, server) look them up by name.
Adding a framework is one entry in `FRAMEWORKS` plus its tests.

The `framework` setting is a name from `FRAMEWORKS`, `auto` or `none`;
`from_setting` is the one place those two words are read. Inside the proxy an
unknown framework is `None`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class MatchRules:
    """How the app's router treats paths."""

    # Litestar ignores a trailing slash; Starlette/FastAPI/Flask/Fastify redirect or 404.
    strict_slash: bool = True
    # Starlette (plain routes), Flask and Fastify answer HEAD on GET routes.
    head_from_get: bool = True
    # Fastify splits the raw path and decodes each segment (an encoded '/' stays
    # inside its segment); the Python frameworks decode the whole path first.
    decode_per_segment: bool = False
    # Django resolves the path before the view looks at the method: a method the
    # route lacks (Django Ninja's 405, HEAD included) still counts under its template.
    method_after_path: bool = False
    # Express matches literal segments case-insensitively (`/ITEMS` is `/items`).
    case_sensitive: bool = True

    @classmethod
    def for_framework(cls, framework: str | None) -> MatchRules:
        found = get(framework)
        return found.rules if found is not None else UNKNOWN_RULES


# Unknown app: lean towards counting rather than dropping.
UNKNOWN_RULES = MatchRules(strict_slash=False)


@dataclass(frozen=True, slots=True)
class Spelling:
    """How a router writes a path parameter in a route template (routes.spell)."""

    # brace: {name} / {name:kind}; angle: <name> / <kind:name>; colon: :name, `*` catch-all.
    style: Literal["brace", "angle", "colon"] = "brace"
    # The parameter kinds the template names (`{id:int}`, `<int:id>`); None: every kind.
    kinds: frozenset[str] | None = frozenset()
    # The kind written for a parameter of no (or an unnamed) kind: Litestar types every one.
    untyped: str | None = None


OPENAPI_SPELLING = Spelling()  # `{name}`, what an unknown framework's templates look like


@dataclass(frozen=True, slots=True)
class Probe:
    """A location where the framework serves its OpenAPI document by default."""

    path: str
    # Place in the probe order (lower first) when the framework is not known yet;
    # None: probed only when the setting names this framework.
    rank: int | None


# Where several frameworks put their document (FastAPI, APIFlask): told apart by its content.
GENERIC_PROBES = (Probe("/openapi.json", 0),)


@dataclass(frozen=True, slots=True)
class Validation:
    """Which error responses the official client reads validation errors from, and how."""

    statuses: frozenset[int]
    parser: str  # the body's shape: a key of metering.validation.PARSERS
    # Only a Content-Type starting with application/json (not +json, not text/*).
    json_only: bool = False
    # The client skips larger bodies (bytes); None: no limit of its own.
    max_body: int | None = None


@dataclass(frozen=True, slots=True)
class Framework:
    """One framework, as its official Apitally client sees the app."""

    name: str  # the settings value (--framework NAME)
    client_tag: str  # the hub startup's `client`, as the official 0.x client sends it
    otlp_name: str  # the OTLP startup's `framework`, as apitally 1.x sends it
    rules: MatchRules
    spelling: Spelling  # templates as the official 0.x client reports them
    # Templates as apitally 1.x reports them, where they differ (Litestar's `path_format`).
    spelling_1x: Spelling | None = None
    # The router checks parameter types (a mismatch is its 404); otherwise it routes
    # first and validates after.
    typed_routing: bool = False
    # Startup `paths`: methods lower-case (Starlette's SchemaGenerator), and template
    # convertors dropped (`{id:int}` -> `{id}`).
    paths_lower_methods: bool = False
    paths_drop_convertors: bool = False
    probes: tuple[Probe, ...] = ()
    # What gives the framework away in its OpenAPI document: a `components.schemas`
    # name, or the default `info.title`.
    doc_schemas: frozenset[str] = frozenset()
    doc_titles: frozenset[str] = frozenset()
    # None: the official client extracts no validation errors.
    validation: Validation | None = None

    def template_spelling(self, otlp: bool = False) -> Spelling:
        """The spelling of reported templates, for the 0.x hub or apitally 1.x (`otlp`)."""
        return self.spelling_1x if otlp and self.spelling_1x is not None else self.spelling


# Pydantic's 422 `detail` list, read by the Starlette middleware (FastAPI's too).
_STARLETTE_VALIDATION = Validation(frozenset({422}), "pydantic", json_only=True, max_body=50_000)
_STARLETTE_SPELLING = Spelling(kinds=frozenset({"path"}))

FRAMEWORKS: dict[str, Framework] = {
    framework.name: framework
    for framework in (
        Framework(
            name="starlette",
            client_tag="python:starlette",
            otlp_name="starlette",
            rules=MatchRules(),
            spelling=_STARLETTE_SPELLING,
            paths_lower_methods=True,
            paths_drop_convertors=True,
            probes=(Probe("/schema", 90),),  # SchemaGenerator's example (YAML)
            validation=_STARLETTE_VALIDATION,
        ),
        Framework(
            name="fastapi",
            # The official FastAPI integration is the Starlette middleware.
            client_tag="python:starlette",
            otlp_name="fastapi",
            rules=MatchRules(head_from_get=False),
            spelling=_STARLETTE_SPELLING,
            paths_lower_methods=True,
            paths_drop_convertors=True,
            doc_schemas=frozenset({"HTTPValidationError"}),
            validation=_STARLETTE_VALIDATION,
        ),
        Framework(
            name="flask",
            client_tag="python:flask",
            otlp_name="flask",
            rules=MatchRules(),
            spelling=Spelling("angle", kinds=frozenset({"int", "float", "uuid", "path"})),
            typed_routing=True,
            probes=(
                Probe("/openapi/openapi.json", 20),  # flask-openapi3
                Probe("/apispec_1.json", 40),  # flasgger
            ),
        ),
        Framework(
            name="litestar",
            client_tag="python:litestar",
            otlp_name="litestar",
            rules=MatchRules(strict_slash=False, head_from_get=False),
            # Litestar requires a type on every path parameter (`/items/{id:int}`, what
            # apitally 0.x reports); apitally 1.x reports its `path_format` (`/items/{id}`).
            spelling=Spelling(kinds=None, untyped="str"),
            spelling_1x=OPENAPI_SPELLING,
            typed_routing=True,
            probes=(Probe("/schema/openapi.json", 10),),
            doc_titles=frozenset({"Litestar API"}),
            validation=Validation(frozenset({400}), "detail-extra", max_body=4095),
        ),
        Framework(
            name="fastify",
            client_tag="js:fastify",
            otlp_name="fastify",
            rules=MatchRules(decode_per_segment=True),
            spelling=Spelling("colon"),
            probes=(Probe("/documentation/json", 30),),  # @fastify/swagger-ui
            validation=Validation(frozenset({400, 422}), "ajv"),
        ),
        Framework(
            # apitally 0.25.1 apitally/django.py (apitally.django_ninja re-exports it):
            # templates are Django's resolved route with `<conv:name>` as `{name}`; startup
            # paths are the Ninja document's, methods as its keys (lower-case); 422 bodies
            # whose `detail` is a list are pydantic errors, with no size limit. 1.x: "django".
            name="django-ninja",
            client_tag="python:django",
            otlp_name="django",
            rules=MatchRules(head_from_get=False, method_after_path=True),
            spelling=OPENAPI_SPELLING,
            paths_lower_methods=True,
            probes=(Probe("/api/openapi.json", None),),  # the tutorial's `path("api/", ...)`
            doc_titles=frozenset({"NinjaAPI"}),
            validation=Validation(frozenset({422}), "pydantic", json_only=True),
        ),
        Framework(
            # npm apitally 0.25.8 dist/express/middleware.js and utils.js: templates are
            # `req.route.path` (`:name`, inline regexes stripped) after the routers' mount
            # paths; unmatched requests (no `req.route`) are not counted; startup paths are
            # the app's routes, upper-case GET/POST/PUT/DELETE/PATCH; 400 and 422 bodies
            # sent with res.send/res.json are read as express-validator, celebrate or
            # NestJS errors, the first shape that finds any. Express 5 routes are
            # case-insensitive, ignore a trailing slash, answer HEAD on GET routes and
            # decode parameters per segment.
            name="express",
            client_tag="js:express",
            otlp_name="express",
            rules=MatchRules(strict_slash=False, decode_per_segment=True, case_sensitive=False),
            spelling=Spelling("colon"),
            validation=Validation(frozenset({400, 422}), "express"),
        ),
    )
}
NAMES = tuple(FRAMEWORKS)

AUTO = "auto"  # not known yet: recognised from the OpenAPI document, errors read in every shape
NONE = "none"  # no framework: nothing recognised, no validation errors read
SETTING_VALUES = (AUTO, NONE, *NAMES)

# Every shape of validation error body, in registry order (an unknown app may send any).
EVERY_VALIDATION: tuple[Validation, ...] = tuple(
    dict.fromkeys(f.validation for f in FRAMEWORKS.values() if f.validation is not None)
)
VALIDATION_STATUSES = frozenset(s for v in EVERY_VALIDATION for s in v.statuses)


def get(name: str | None) -> Framework | None:
    """The framework of that name; None for None and for names the registry lacks."""
    return FRAMEWORKS.get(name) if name is not None else None


@dataclass(frozen=True, slots=True)
class Choice:
    """What the `framework` setting says: the framework, or None and whether to guess it."""

    framework: Framework | None
    guess: bool  # `auto`: recognise the app from its OpenAPI document, read every error shape

    @property
    def name(self) -> str | None:
        return self.framework.name if self.framework is not None else None


def from_setting(value: str) -> Choice:
    """The `framework` setting's value (a name, `auto` or `none`) as a Choice."""
    if value == AUTO:
        return Choice(None, True)
    if value == NONE:
        return Choice(None, False)
    try:
        return Choice(FRAMEWORKS[value], False)
    except KeyError:
        raise ValueError(
            f"unknown framework {value!r}: one of {', '.join(SETTING_VALUES)}"
        ) from None


def probe_paths(framework: str | None = None) -> tuple[tuple[str, str | None], ...]:
    """Where to look for the OpenAPI document, in order, with the framework each implies.

    The set framework's own unranked locations come first, then every ranked one.
    """
    own = get(framework)
    first = [(p.path, own.name) for p in own.probes if p.rank is None] if own else []
    ranked = [(p, None) for p in GENERIC_PROBES] + [
        (p, f.name) for f in FRAMEWORKS.values() for p in f.probes if p.rank is not None
    ]
    ranked.sort(key=lambda pair: pair[0].rank or 0)
    return (*first, *((p.path, name) for p, name in ranked))


def detect(schemas: object, title: object) -> str | None:
    """The framework an OpenAPI document's schema names or title give away, if any."""
    if isinstance(schemas, dict):
        for f in FRAMEWORKS.values():
            if any(s in schemas for s in f.doc_schemas):
                return f.name
    if isinstance(title, str):
        for f in FRAMEWORKS.values():
            if title in f.doc_titles:
                return f.name
    return None
