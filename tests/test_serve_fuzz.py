"""Property-based fuzzing of the rollout service against its own OpenAPI schema.

Schemathesis draws requests from docs/openapi.json's operations (valid bodies and, in
negative mode, bodies that break the schema) and sends them to the ASGI app of a real
tiny run; every response must be a documented, schema-conforming non-5xx answer. The
server is given small limits (max_new_tokens, batch_rows) so that the valid requests the
fuzzer finds stay cheap; the examples per operation are bounded to keep the test short.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

from mega_trading.serve.app import create_app
from mega_trading.serve.schemas import ServeSettings
from tests.test_serve import build_tiny_run

FUZZ_SETTINGS = ServeSettings(batch_rows=4, max_new_tokens=64, max_body_bytes=64 * 1024,
                              batch_window_ms=1, queue_timeout_s=10, request_timeout_s=20)

# Limits that depend on the run (vocabulary, block size) and on the server's settings (n,
# n * length, body size) are not in the static schema, so a schema-valid body may rightly
# get 422 or 413; a schema-invalid one is rejected with 422, or 413 when it is also huge.
FUZZ_CONFIG = schemathesis.config.SchemathesisConfig.from_dict({"checks": {
    "positive_data_acceptance": {"expected-statuses": ["200", "413", "422"]},
    "negative_data_rejection": {"expected-statuses": ["413", "422"]},
}})


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    run, data = build_tiny_run(tmp_path_factory.mktemp("serve_fuzz"))
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(run, data, FUZZ_SETTINGS),
                                          config=FUZZ_CONFIG)


def operations(api_schema) -> dict[str, object]:
    found = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        found[f"{operation.method.upper()} {operation.path}"] = operation
    return found


def test_the_fuzzer_sees_every_operation(api_schema):
    assert set(operations(api_schema)) == {"POST /v1/rollouts", "GET /v1/model", "GET /healthz"}


@pytest.mark.parametrize("name, mode, examples", [
    ("POST /v1/rollouts", GenerationMode.POSITIVE, 80),
    ("POST /v1/rollouts", GenerationMode.NEGATIVE, 80),
    ("GET /v1/model", GenerationMode.POSITIVE, 3),
    ("GET /healthz", GenerationMode.POSITIVE, 3),
])
def test_no_server_errors_and_responses_match_the_schema(api_schema, name, mode, examples):
    """Every default schemathesis check: no 5xx, documented status codes and content
    types, responses that conform to the schema, valid bodies accepted and invalid ones
    rejected (with the statuses of FUZZ_CONFIG)."""
    operation = operations(api_schema)[name]

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case):
        case.call_and_validate()

    check()
