"""The HTTP API's contract: `GET /openapi.json` is a valid OpenAPI 3.1 document covering
every route, and schemathesis drives every operation of the real binary from it, with an
admin key and without one: no 5xx, no status, header, content type or body the document
does not allow, and no request answered with an error changes the lake or the spool."""
import glob
import json
import os
import re
import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import Server, run

ROUTES = {
    "/health", "/openapi.json", "/metrics", "/v1/deployment",
    "/v1/events", "/v1/keys", "/v1/sql",
    "/v1/completions", "/v1/chat/completions", "/v1/models",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    "/v1/training/jobs", "/v1/training/jobs/{id}", "/v1/training/jobs/{id}/events",
    "/v1/attributions/{inference_id}",
    "/v1/epochs", "/v1/epochs/{n}", "/v1/epochs/{n}/close", "/v1/epochs/{n}/compute", "/v1/epochs/{n}/verify",
    "/v1/epochs/{n}/proofs/{account}", "/v1/epochs/{n}/tree", "/v1/anchors/verify",
}
# Signers need the deployment before they have anything else: it takes no key.
PUBLIC = {"/health", "/openapi.json", "/metrics", "/v1/deployment"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
# Examples per operation and key mode: enough to reach every branch of the request types,
# bounded so the suite stays quick.
EXAMPLES = int(os.environ.get("LEDGERLAKE_SCHEMATHESIS_EXAMPLES", "40"))
# Object-store adapter URIs that fuzzing invents go to a closed loopback port, never to a
# cloud endpoint or metadata address.
NO_CLOUD = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "fuzz", "AWS_SECRET_ACCESS_KEY": "fuzz",
    "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "AWS_ALLOW_HTTP": "true",
}


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx, value):
    return value.encode() if isinstance(value, str) else json.dumps(value).encode()


@schemathesis.serializer("application/vnd.apache.arrow.stream")
def _arrow(ctx, value):
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("contract")
    # No background writers (the attribution job, token expiry): the checks below compare
    # the lake before and after each request.
    srv = Server(data, env={**NO_CLOUD, "LEDGERLAKE_ATTRIBUTION_INTERVAL_S": "0", "LEDGERLAKE_TOKEN_RETENTION_DAYS": "0"})
    srv.data = data
    yield srv
    srv.stop()


# The document as the binary prints it; the first test checks the server serves the same.
schema = schemathesis.openapi.from_dict(json.loads(run("openapi")))


def metric(srv, name):
    text = requests.get(srv.url + "/metrics", timeout=10).text
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def settled_state(srv):
    """What an error must leave alone: the Delta commits of every table, the API keys and
    the completions spooled for billing. First waits until the forwarder has moved every
    spooled completion into the lake, so its commits cannot be mistaken for the request's."""
    deadline = time.time() + 30
    while time.time() < deadline:
        written = metric(srv, "ledgerlake_spool_written_total")
        done = metric(srv, "ledgerlake_spool_forwarded_total") + metric(srv, "ledgerlake_spool_quarantined_total")
        if written == done:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the spool did not drain")
    commits = sorted(p for p in glob.glob(f"{srv.data}/**/_delta_log/*.json", recursive=True)
                     if re.fullmatch(r"\d{20}\.json", os.path.basename(p)))
    keys = [open(p).read() for p in sorted(glob.glob(f"{srv.data}/**/api-keys.json", recursive=True))]
    return commits, keys, metric(srv, "ledgerlake_spool_written_total")


def partially_accepted(response):
    """`POST /v1/events` answers 422 with `accepted` > 0 when it stored the valid items of a
    batch and refused the others (documented); every other error stores nothing."""
    content_type = response.headers.get("content-type", [""])  # schemathesis keeps every value of a header
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if response.status_code != 422 or not content_type.startswith("application/json"):
        return False
    body = response.json()
    return isinstance(body, dict) and body.get("accepted", 0) > 0


def test_the_document_is_valid_openapi_3_1_and_covers_every_route(api_server):
    r = requests.get(api_server.url + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == ROUTES
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer",
                                                              "description": doc["components"]["securitySchemes"]["bearer"]["description"]}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("responses"), f"{method} {path} documents no response"
            assert ("security" in op) == (path not in PUBLIC), f"{method} {path}: security"
    # The command line prints the same document.
    assert json.loads(run("openapi")) == doc
    # Every event kind of the data contract is in it, with its own fields.
    kinds = [s["properties"]["kind"]["enum"][0] for s in doc["components"]["schemas"].values()
             if "kind" in s.get("properties", {}) and "enum" in s["properties"]["kind"]]
    # The kinds only the epoch job writes are documented as tables, but not as what a caller sends.
    assert {"epoch.closed", "reward.earned", "anchor.logged"} <= set(kinds)
    sendable = doc["components"]["schemas"]["Event"]["oneOf"]
    assert len(sendable) == 17 and {"$ref": "#/components/schemas/RewardEarned"} not in sendable
    assert {"$ref": "#/components/schemas/AccessRequested"} in sendable
    assert {"$ref": "#/components/schemas/AccessRevoked"} in sendable and {"$ref": "#/components/schemas/EventVoided"} in sendable
    assert len(kinds) == 20 and "inference.cited" in kinds and "datanet.created" in kinds and "training.run" in kinds and "training.metric" in kinds
    assert "inference.tokens" in kinds and "inference.attributed" in kinds
    assert "access.revoked" in kinds and "event.voided" in kinds
    # The EventKind enum lists exactly the kinds a caller may send: every one but the epoch job's.
    callable_kinds = doc["components"]["schemas"]["EventKind"]["enum"]
    assert len(callable_kinds) == 17 and set(callable_kinds) == set(kinds) - {"epoch.closed", "reward.earned", "anchor.logged"}
    assert "access.revoked" in callable_kinds and "event.voided" in callable_kinds and "access.requested" in callable_kinds

    # GET /v1/deployment (no key) names the EIP-712 domain participants sign under.
    deployment = requests.get(api_server.url + "/v1/deployment", timeout=10).json()
    assert re.fullmatch(r"0x[0-9a-f]{64}", deployment["deployment_id"]), deployment
    assert deployment["chain_id"] is None and deployment["max_event_skew_s"] == 300
    assert deployment["eip712_domain"] == {"name": "ledgerlake", "version": "1", "salt": deployment["deployment_id"]}, deployment


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_with_an_admin_key(case, api_server):
    before = settled_state(api_server)
    response = case.call(base_url=api_server.url, headers={"Authorization": f"Bearer {api_server.key}"}, timeout=120)
    case.validate_response(response, checks=CHECKS)
    if response.status_code >= 400 and not partially_accepted(response):
        after = settled_state(api_server)
        assert after == before, (f"{case.method} {case.path} answered {response.status_code} and changed the lake, the keys or the spool: "
                                 f"new commits {sorted(set(after[0]) - set(before[0]))}, spooled {before[2]} -> {after[2]}")


@schema.parametrize()
@settings(max_examples=max(EXAMPLES // 4, 5), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_without_a_key(case, api_server):
    before = settled_state(api_server)
    response = case.call(base_url=api_server.url, timeout=120)
    case.validate_response(response, checks=CHECKS)
    # (schemathesis also probes methods a route does not have: 405 before any key check.)
    if case.path not in PUBLIC and case.method.upper() == case.operation.method.upper():
        assert response.status_code == 401, f"{case.method} {case.path} answered {response.status_code} without a key"
        assert settled_state(api_server) == before
