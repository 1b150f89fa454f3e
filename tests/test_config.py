"""The config schema shared by Serve and batch, and the Serve config files we ship."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from prism_ray.cli import UsageError, validate_serve_config
from prism_ray.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]


def _model(name="a", **kw):
    return {"name": name, "model": f"/m/{name}", **kw}


def test_shipped_serve_configs_are_valid():
    for name in ("local.yaml", "cluster-gpu.yaml"):
        doc = validate_serve_config(str(ROOT / "deployments" / name))
        args = AppConfig.model_validate(doc["applications"][0]["args"])
        assert doc["applications"][0]["import_path"] == "deployments.app:build_app"
        assert args.default_model in [m.name for m in args.models]
    gpu = AppConfig.model_validate(validate_serve_config(str(ROOT / "deployments/cluster-gpu.yaml"))["applications"][0]["args"])
    assert sorted(m.size for m in gpu.models) == ["0.8b", "2b", "4b", "4b-exp", "9b"]
    by_size = {m.size: m for m in gpu.models}
    assert by_size["9b"].scorer.ray_actor_options["num_gpus"] == 1
    assert by_size["0.8b"].scorer.ray_actor_options["num_gpus"] < 1


def test_errors_name_the_field():
    with pytest.raises(ValidationError) as err:
        AppConfig.model_validate({"models": [_model(scorer={"max_batch_tokens": 0})]})
    assert err.value.errors()[0]["loc"] == ("models", 0, "scorer", "max_batch_tokens")
    with pytest.raises(ValidationError, match="duplicate names"):
        AppConfig.model_validate({"models": [_model(), _model()]})
    with pytest.raises(ValidationError, match="default_model 'x'"):
        AppConfig.model_validate({"models": [_model()], "default_model": "x"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        AppConfig.model_validate({"models": [_model(colour="red")]})
    with pytest.raises(ValidationError, match="unknown preset"):
        AppConfig.model_validate({"models": [_model(build_preset="huge")]})


def test_kernel_choices_and_cuda_graphs_are_checked_where_the_config_is_read():
    ok = AppConfig.model_validate({"models": [_model(kernels={"attention": "padded"}, evidence={"cuda_graphs": True})]})
    assert ok.models[0].kernels == {"attention": "padded"} and ok.models[0].evidence.cuda_graphs
    with pytest.raises(ValidationError) as err:
        AppConfig.model_validate({"models": [_model(kernels={"attention": "flash"})]})
    assert err.value.errors()[0]["loc"] == ("models", 0, "kernels")
    assert "kernels.attention must be one of ['sdpa', 'padded'], not 'flash'" in str(err.value)
    with pytest.raises(ValidationError, match="evidence.cuda_graphs needs a CUDA device"):
        AppConfig.model_validate({"models": [_model(device="cpu", evidence={"cuda_graphs": True})]})


def test_find_model_by_name_hub_id_size_and_default():
    cfg = AppConfig.model_validate({"models": [
        _model("small", size="0.8B"), {"name": "big", "model": "infgrad/Prism-Qwen3.5-Reranker-9B"}]})
    assert cfg.default_model == "small"
    assert cfg.find_model(None).name == "small"
    assert cfg.find_model("BIG").name == "big"
    assert cfg.find_model("9b").name == "big"
    assert cfg.find_model("0.8b").name == "small"
    assert cfg.find_model("infgrad/prism-qwen3.5-reranker-9b").name == "big"
    assert cfg.find_model("2b") is None
    # exactly what the API schema's model pattern admits: no blank key, no padding, ASCII case only
    assert cfg.find_model("") is None and cfg.find_model(" small") is None
    no_size = AppConfig.model_validate({"models": [{"name": "x", "model": "/m/x"}]})
    assert no_size.find_model("") is None and no_size.find_model(None).name == "x"


def test_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("PRISM_API_KEYS", "k1, k2")
    cfg = AppConfig.model_validate({"models": [_model()], "api_keys": ["k0"]})
    assert cfg.resolved_api_keys() == {"k0", "k1", "k2"}


@pytest.mark.slow  # the CLI in a subprocess
def test_serve_command_rejects_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "deployments/local.yaml").read_text().replace("max_batch_tokens: 1024", "max_batch_tokens: -5", 1))
    proc = subprocess.run([sys.executable, "-m", "prism_ray.cli", "serve", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "applications.0.args.models.0.scorer.max_batch_tokens" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(UsageError, match="cannot read"):
        validate_serve_config(str(tmp_path / "missing.yaml"))
