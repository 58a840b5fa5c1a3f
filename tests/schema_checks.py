"""schemathesis' positive_data_acceptance for moelm serve: a schema-valid request is accepted, or refused with a 400
whose error code its operation lists in `x-refusals` (a rule JSON Schema cannot state, moelm.serve.errors.REFUSALS).
Used by tests/test_serve_schema.py, and by the CLI with SCHEMATHESIS_HOOKS=schema_checks (docs/serving.md)."""
from __future__ import annotations

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance


def declared(case, response) -> bool:
    """Whether `response` is a 400 refusal that the case's operation declares."""
    if response.status_code != 400:
        return False
    listed = case.operation.definition.raw["responses"].get("400", {}).get("x-refusals", [])
    try:
        return response.json()["error"]["code"] in listed
    except (ValueError, KeyError, TypeError):
        return False


@schemathesis.check
def positive_data_acceptance_or_declared_refusal(ctx, response, case):
    if declared(case, response):
        return None
    return positive_data_acceptance(ctx, response, case)
