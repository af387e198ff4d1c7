"""Property-based fuzzing of every route with schemathesis, from the service's own OpenAPI schema, against the
real server: whatever the generated request (valid or not), the answer is never a 5xx, its status is one the
schema documents, and a documented body has the documented content type and shape.

Path parameters are drawn half the time from the models the server really has (``mnist``, ``tiny``,
version ``1``), so generated bodies reach the decoders and the models instead of stopping at a 404.
"""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings

MAX_EXAMPLES = 25  # per route; about 25 routes, which keeps the whole run well under a minute
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

# The schema the service serves, built in process (nothing is loaded to build it); the test below checks that
# the running server serves the same one.
OPENAPI = create_app(Settings(access_log=False)).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)
REAL = {"name": st.sampled_from(["mnist", "tiny"]), "version": st.just("1")}


@schema.hook
def before_generate_path_parameters(context, strategy):
    def with_real_names(parameters):
        if not isinstance(parameters, dict):
            return st.just(parameters)
        real = {key: REAL[key] for key in parameters if key in REAL}
        return st.fixed_dictionaries(real).map(lambda chosen: {**parameters, **chosen})

    return st.one_of(strategy, strategy.flatmap(with_real_names))


def test_the_fuzzed_schema_is_the_one_the_server_serves(server):
    assert httpx.get(f"{server.url}/openapi.json").json() == OPENAPI


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_route_answers_a_5xx_or_off_schema(case, server):
    case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=30)
