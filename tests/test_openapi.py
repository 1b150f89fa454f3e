"""The OpenAPI contract of one config, without Ray: what `apply_config` states matches what the server does."""

from __future__ import annotations

import re

import pytest

from prism_ray.api import CohereRerankRequest, JinaRerankRequest, TeiRerankRequest
from prism_ray.config import AppConfig
from prism_ray.openapi import apply_config, component_schemas, key_pattern

REQUESTS = [CohereRerankRequest, JinaRerankRequest, TeiRerankRequest]


def _doc(config: AppConfig) -> dict:
    base = {"paths": {"/v2/rerank": {"post": {"responses": {}}}, "/health": {"get": {"responses": {}}}},
            "components": {"schemas": component_schemas(*REQUESTS)}}
    return apply_config(base, config, [m.__name__ for m in REQUESTS])


CONFIG = AppConfig.model_validate({
    "models": [{"name": "prism-tiny", "model": "/m/tiny", "size": "0.8b"},
               {"name": "prism-q3", "model": "org/Q3-Reranker", "size": "4b-exp", "evidence": None}],
    "limits": {"max_documents": 7, "max_query_chars": 99, "max_evidence_documents": 4, "max_new_tokens": 50}})


@pytest.mark.parametrize("key", ["prism-tiny", "PRISM-TINY", "0.8B", "4b-exp", "org/q3-reranker", "/m/tiny",
                                 "", " prism-tiny", "prism-tiny ", "13b", "prism", "K", "\u212aey", "0x8b"])
def test_the_model_pattern_admits_exactly_what_find_model_finds(key):
    pattern = re.compile(key_pattern(["prism-tiny", "/m/tiny", "0.8b", "prism-q3", "org/Q3-Reranker", "4b-exp"]))
    assert bool(pattern.search(key)) == (CONFIG.find_model(key) is not None)


def test_limits_and_models_are_stated():
    schemas = _doc(CONFIG)["components"]["schemas"]
    for name, field in (("CohereRerankRequest", "documents"), ("JinaRerankRequest", "documents"),
                        ("TeiRerankRequest", "texts")):
        props = schemas[name]["properties"]
        assert props[field]["minItems"] == 1 and props[field]["maxItems"] == 7
        assert props["query"]["maxLength"] == 99 and props["query"]["minLength"] == 1
    assert schemas["EvidenceOptions"]["properties"]["top_n"]["maximum"] == 4
    assert schemas["EvidenceOptions"]["properties"]["max_new_tokens"]["anyOf"][0]["maximum"] == 50


def test_evidence_only_for_models_with_an_evidence_tier():
    cohere = _doc(CONFIG)["components"]["schemas"]["CohereRerankRequest"]
    assert cohere["if"] == {"required": ["evidence"], "properties": {"evidence": {"type": "object"}}}
    allowed = cohere["then"]["properties"]["model"]["anyOf"][0]["pattern"]
    assert re.search(allowed, "prism-tiny") and not re.search(allowed, "prism-q3")
    default_without = AppConfig.model_validate({**CONFIG.model_dump(), "default_model": "prism-q3"})
    then = _doc(default_without)["components"]["schemas"]["CohereRerankRequest"]["then"]
    assert then["required"] == ["model"]  # the default cannot generate: evidence needs a model named


def test_bearer_auth_declared_only_with_keys():
    assert "securitySchemes" not in _doc(CONFIG)["components"]
    keyed = _doc(AppConfig.model_validate({**CONFIG.model_dump(), "api_keys": ["k"]}))
    assert keyed["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert keyed["paths"]["/v2/rerank"]["post"]["security"] == [{"bearer": []}]
    assert "401" in keyed["paths"]["/v2/rerank"]["post"]["responses"]
    assert "security" not in keyed["paths"]["/health"]["get"]
