"""The OpenAPI document of a real ``hexin serve --api-key`` process matches what the server
answers: schemathesis generates requests for every operation in /openapi.json (valid and
invalid bodies, parameters and methods, with and without the key) and checks that no
answer is a 5xx and that each one's status, content type, headers and body are the ones
the document gives.

It runs on the bundled story model (fast; it has no chat template, so chat completions
answer 400, which the document also says), with a small context and default reply cap so
that generated requests stay short; each operation is bounded to a few examples.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from server_util import Server

KEY = "openapi-key"
#: the status codes each operation answered in the run
SEEN: dict[str, Counter] = {}
#: generated requests per operation: a few minutes for the whole module on two cores
MAX_EXAMPLES = 25
#: by name, from schemathesis' registry (``schemathesis.checks``)
CHECKS = [
    getattr(schemathesis.checks, name)
    for name in (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "unsupported_method",  # 405 with Allow for a method the path does not serve
        "ignored_auth",  # no key or a wrong one is 401
    )
]
# Not allow_header_conformance: it compares an OPTIONS's Allow with the methods of the one
# path the operation is under, but "/api/sessions/import" is also "/api/sessions/{id}"
# (GET, PATCH, DELETE serve it), which schemathesis itself counts as declared when it
# picks unsupported methods; test_wrong_method_is_405_with_allow checks Allow instead.


@pytest.fixture(scope="module")
def server(story_dir, tmp_path_factory):
    extra = ("--context", "512", "--max-tokens-default", "16")
    srv = Server(story_dir, tmp_path_factory.mktemp("openapi"), api_key=KEY, extra=extra)
    yield srv.start()
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    # the key as the document's bearer scheme, so that the requests meant to go without
    # it (ignored_auth, a dropped Authorization header) really do
    config = SchemathesisConfig.from_dict({"auth": {"openapi": {"bearer": {"bearer": KEY}}}})
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config, timeout=30)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests every run: a failure reproduces
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case, server):
    response = case.call_and_validate(checks=CHECKS, timeout=60)
    SEEN.setdefault(case.operation.label, Counter())[response.status_code] += 1


def test_the_operations_were_reached():
    """The run above got past the key and into the handlers: every operation answered
    something besides 401, and the generating ones generated."""
    if not SEEN:
        pytest.skip("runs after test_every_operation_answers_as_documented")
    print({label: dict(codes) for label, codes in sorted(SEEN.items())})
    for label, codes in SEEN.items():
        assert set(codes) - {401}, (label, codes)
    for label in ("POST /v1/completions", "POST /tokenize", "POST /api/sessions"):
        assert codes_2xx(SEEN[label]), (label, SEEN[label])


def codes_2xx(codes: Counter) -> int:
    return sum(n for code, n in codes.items() if 200 <= code < 300)


def test_document_names_the_error_answers(server):
    """No FastAPI 422 anywhere: validation errors are 400 in the Error shape, and the
    paths the API key guards say 401 (and name the bearer scheme)."""
    doc = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            codes = set(op["responses"])
            assert "422" not in codes, (method, path)
            if "requestBody" in op:
                assert {"400", "413"} <= codes, (method, path)
            if path.startswith(("/api/", "/v1/", "/tokenize", "/detokenize", "/metrics")):
                assert "401" in codes and op["security"] == [{"bearer": []}], (method, path)
            else:
                assert "401" not in codes and "security" not in op, (method, path)


def test_wrong_method_is_405_with_allow(server):
    with server.http() as http:
        for method, path, allow in (
            ("TRACE", "/v1/models", "GET"),
            ("DELETE", "/v1/models", "GET"),
            ("GET", "/v1/chat/completions", "POST"),
            ("PUT", "/api/sessions/some-id", "GET, PATCH, DELETE"),
            ("PUT", "/api/sessions/import", "GET, POST, PATCH, DELETE"),
        ):
            r = http.request(method, path)
            assert r.status_code == 405, (method, path, r.status_code)
            assert r.headers["allow"] == allow
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        # a path no route serves stays "not found", whatever the method
        for method in ("GET", "POST", "TRACE"):
            assert http.request(method, "/v1/embeddings").status_code == 404
