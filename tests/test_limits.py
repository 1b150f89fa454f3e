"""The limits table (`prism_ray.limits`): it covers every limit of the config, the OpenAPI document states each
at its spots with the configured value, and the check refuses one past it with a message naming it. No Ray."""

from __future__ import annotations

import pytest

from prism_ray.api import CohereRerankRequest, JinaRerankRequest, ScoreRequest, TeiRerankRequest
from prism_ray.config import AppConfig, LimitsConfig
from prism_ray.errors import ErrorKind, PrismError
from prism_ray.limits import EVERY_REQUEST, LIMITS, check, nodes_at
from prism_ray.openapi import apply_config, component_schemas

REQUESTS = [CohereRerankRequest, JinaRerankRequest, TeiRerankRequest]


def test_every_limit_of_the_config_is_in_the_table_and_named_by_its_message():
    not_limits = {"retry_after_s"}  # a hint the 429/503 carry, not a bound on a request
    assert {limit.name for limit in LIMITS.values()} == set(LimitsConfig.model_fields) - not_limits
    for limit in LIMITS.values():
        err = limit.refusal(getattr(LimitsConfig(), limit.name), "field", 10**9)
        assert limit.name in err.message and err.kind is limit.kind and err.param == "field"


def test_the_openapi_document_states_each_limit_where_the_table_says():
    # Distinct values, so a spot holding another limit's value is caught.
    values = {name: 1000 + n for n, name in enumerate(
        ["max_documents", "max_query_chars", "max_evidence_documents", "max_new_tokens", "max_chunks_per_doc"])}
    config = AppConfig.model_validate({"models": [{"name": "m", "model": "/m"}], "limits": values})
    base = {"paths": {}, "components": {"schemas": component_schemas(*REQUESTS, ScoreRequest)}}
    comps = apply_config(base, config, [m.__name__ for m in REQUESTS])["components"]["schemas"]
    stated = 0
    for limit in LIMITS.values():
        for spot in limit.spots:
            names = [m.__name__ for m in REQUESTS] if spot.component == EVERY_REQUEST else [spot.component]
            for name in names:
                for node in nodes_at(comps[name], spot.path):
                    if spot.keyword in node:
                        assert node[spot.keyword] == values[limit.name], (limit.name, name, spot.path)
                        stated += 1
    props = comps["CohereRerankRequest"]["properties"]
    assert props["documents"]["maxItems"] == values["max_documents"]
    assert props["query"]["maxLength"] == values["max_query_chars"]
    assert comps["TeiRerankRequest"]["properties"]["texts"]["maxItems"] == values["max_documents"]
    queries = comps["ScoreRequest"]["properties"]["queries"]["anyOf"]
    assert {alt.get("type"): alt.get("maxLength", alt.get("items", {}).get("maxLength")) for alt in queries} == {
        "string": values["max_query_chars"], "array": values["max_query_chars"], "null": None}
    assert [alt["maxItems"] for alt in queries if alt.get("type") == "array"] == [values["max_documents"]]
    assert comps["EvidenceOptions"]["properties"]["max_new_tokens"]["anyOf"][0]["maximum"] == values["max_new_tokens"]
    assert stated >= 15  # every request model's query and list, the score request's four fields, the options


@pytest.mark.parametrize("value,refused", [(5, False), (6, True)])
def test_check_refuses_past_the_limit_with_its_field_and_kind(value, refused):
    limits = LimitsConfig(max_documents=5)
    if not refused:
        check(limits, "max_documents", value, "texts")
        return
    with pytest.raises(PrismError) as err:
        check(limits, "max_documents", value, "texts")
    assert err.value.kind is ErrorKind.TOO_LARGE and err.value.param == "texts"
    assert err.value.message == "texts: 6 documents; the limit is 5 (max_documents)"


def test_a_limit_to_wait_out_carries_retry_after():
    err = LIMITS["max_in_flight"].refusal(3, retry_after_s=2)
    assert err.status == 429 and err.headers == {"Retry-After": "2"} and "max_in_flight" in err.message
