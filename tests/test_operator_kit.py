"""The operator's kit, without a cluster: the KubeRay RayService, `prism-ray serve --check`, the Dockerfile.

The RayService must be one KubeRay accepts (its vendored CRD schema, with the API server's pruning made
strict so a misspelt field fails here instead of vanishing there) and must serve the same app as
deployments/cluster-gpu.yaml. `serve --check` must pass good configs and name the bad field of bad ones,
starting nothing.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prism_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
RAYSERVICE = ROOT / "deployments" / "kuberay" / "rayservice.yaml"
CRD = ROOT / "deployments" / "kuberay" / "crd" / "ray.io_rayservices.yaml"
GPU_CONFIG = ROOT / "deployments" / "cluster-gpu.yaml"
LOCAL_CONFIG = ROOT / "deployments" / "local.yaml"
DOCKERFILE = ROOT / "deployments" / "docker" / "Dockerfile"


def _strict(schema):
    """The CRD schema as the API server applies it: an object field not in `properties` is pruned (dropped
    without a word) unless the schema keeps unknown fields; here it is an error instead."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validator():
    from jsonschema import Draft202012Validator

    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "RayService"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return Draft202012Validator(_strict(v1["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# -- the RayService ----------------------------------------------------------------------------------------

def test_rayservice_validates_against_kuberays_crd(crd_validator, manifest):
    """The manifest is a valid ray.io/v1 RayService; the strict validator does refuse a misspelt field and
    a wrong type (so its silence above means something)."""
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert _errors(crd_validator, manifest) == []
    typo = copy.deepcopy(manifest)
    typo["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = typo["spec"]["rayClusterConfig"].pop("enableInTreeAutoscaling")
    assert any("enableInTreeAutoScaling" in e for e in _errors(crd_validator, typo))
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "18"
    assert any("maxReplicas" in e for e in _errors(crd_validator, wrong_type))


def test_rayservice_serves_the_gpu_app(manifest):
    """serveConfigV2 is deployments/cluster-gpu.yaml's app: the same args, import path, route and HTTP
    options (the code comes from the image, so it has no runtime_env), and it passes `serve --check`'s
    validation (Ray's Serve schema and the project's AppConfig)."""
    from prism_ray.serve_check import check

    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    gpu = yaml.safe_load(GPU_CONFIG.read_text())
    assert [a["args"] for a in embedded["applications"]] == [a["args"] for a in gpu["applications"]]
    for ours, theirs in zip(embedded["applications"], gpu["applications"]):
        assert {k: v for k, v in ours.items() if k != "args"} == {k: v for k, v in theirs.items() if k not in ("args", "runtime_env")}
    assert embedded["http_options"] == gpu["http_options"] and embedded["proxy_location"] == gpu["proxy_location"]
    checked = check(RAYSERVICE)
    assert list(checked.apps) == ["prism"] and len(checked.apps["prism"].models) == 5 and not checked.notes


def test_rayservice_cluster_fits_the_app(manifest):
    """A CPU head that runs no replicas, an autoscaled GPU worker group with room for every tier's minimum
    and maximum replicas, readiness on the Serve port's /health/ready, one image and Ray version
    throughout, equal to the Dockerfile's and the Ray we test with."""
    import ray

    from prism_ray.config import AppConfig

    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    (head_container,) = head["template"]["spec"]["containers"]
    assert head["rayStartParams"]["num-cpus"] == "0" and "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus_per_pod = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus_per_pod >= 1 and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    app = AppConfig.model_validate(serve_config["applications"][0]["args"])
    tiers = [t for m in app.models for t in (m.scorer, m.evidence) if t is not None]

    def gpus(bound: str) -> float:
        return sum(t.ray_actor_options.get("num_gpus", 0) * (t.num_replicas or t.autoscaling_config[bound]) for t in tiers)

    assert gpus("min_replicas") <= group["minReplicas"] * gpus_per_pod
    assert gpus("max_replicas") <= group["maxReplicas"] * gpus_per_pod

    probe = worker["readinessProbe"]["httpGet"]
    assert probe == {"path": "/health/ready", "port": serve_config["http_options"]["port"]}
    assert head_container["image"] == worker["image"]
    docker_ray = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert cluster["rayVersion"] == docker_ray == ray.__version__


def test_rayservice_proxies_run_the_body_guard_under_the_apps_limits(manifest):
    """Every pod's Serve proxy runs the body guard, with what `prism-ray serve` would set for the app's limits
    (the guard's defaults are `LimitsConfig`'s, so PRISM_RAY_PROXY_LIMITS is needed only where they differ)."""
    from prism_ray.config import AppConfig
    from prism_ray.proxy_guard import CALLBACK_VARIABLE, GUARDED, LIMITS_VARIABLE, proxy_environment, proxy_limits

    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    (application,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    routes = {application.get("route_prefix") or "/": AppConfig.model_validate(application["args"]).limits}
    wanted = proxy_environment(routes)

    def guarded(limits: dict) -> dict:
        return {prefix: {n: getattr(lim, n) for n in GUARDED} for prefix, lim in limits.items()}

    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        assert env[CALLBACK_VARIABLE] == wanted[CALLBACK_VARIABLE]
        assert guarded(proxy_limits(env)) == guarded(proxy_limits(wanted)), LIMITS_VARIABLE


def test_dockerfile_builds_on_rays_gpu_image_with_the_gpu_extra():
    """The base is Ray's official GPU image at the tested Ray version; the project goes in with its `gpu`
    extra and without letting pip move Ray; weights are a volume, not image layers."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-gpu$", text, re.M)
    assert re.search(r'pip install .*"\.\[gpu\]".*"ray\[serve,data\]==\$\{RAY_VERSION\}"', text)
    assert "HF_HOME=/models/huggingface" in text and 'VOLUME ["/models"]' in text
    for copied in re.findall(r"^COPY \S+ (.+) \./", text, re.M):
        for path in copied.split():
            assert (ROOT / path).exists(), path


# -- prism-ray serve --check --------------------------------------------------------------------------------

def _write(tmp_path: Path, name: str, doc) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("config", [LOCAL_CONFIG, GPU_CONFIG, RAYSERVICE], ids=["local", "cluster-gpu", "rayservice"])
def test_check_passes_good_configs_without_starting_anything(config, capsys):
    import ray

    assert main(["serve", "--check", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {config}") and "prism:" in out
    assert ("spec.serveConfigV2" in out) == (config == RAYSERVICE)
    assert not ray.is_initialized()


def _bad_local(mutate):
    doc = yaml.safe_load(LOCAL_CONFIG.read_text())
    mutate(doc)
    return doc


@pytest.mark.parametrize("mutate,field,needle", [
    (lambda d: d["applications"][0]["args"]["models"][0]["scorer"].update(max_batch_tokens=0),
     "applications.0.args.models.0.scorer.max_batch_tokens", "greater than 0"),
    (lambda d: d["applications"][0]["args"]["models"][1]["evidence"].update(max_batch_pairs=8),
     "applications.0.args.models.1.evidence", "max_active_pairs"),
    (lambda d: d["applications"][0]["args"]["limits"].update(max_documnets=5),
     "applications.0.args.limits.max_documnets", "Extra inputs"),
    (lambda d: d["applications"][0].update(route_prefx="/x"), "applications.0.route_prefx", "not a Ray Serve field"),
    (lambda d: d["applications"][0].update(deployments=[{"name": "router", "num_replicas": -1}]),
     "applications.0.deployments.0.num_replicas", "greater than 0"),
], ids=["tier-limit", "renamed-field", "limits-typo", "serve-typo", "serve-value"])
def test_check_names_the_bad_field(tmp_path, capsys, mutate, field, needle):
    path = _write(tmp_path, "bad.yaml", _bad_local(mutate))
    assert main(["serve", "--check", path]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {field}" in err and needle in err, err


def test_check_reads_a_rayservices_embedded_config(tmp_path, manifest, capsys):
    """Inside a RayService the field path starts at spec.serveConfigV2; a local working_dir, which
    `serve run` would upload, is an error there (nothing uploads it)."""
    def with_serve_config(change):
        doc = copy.deepcopy(manifest)
        serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        change(serve_config)
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve_config, sort_keys=False)
        return doc

    bad = _write(tmp_path, "rs-bad.yaml", with_serve_config(
        lambda c: c["applications"][0]["args"]["models"][3]["evidence"].update(max_active_pairs=0)))
    assert main(["serve", "--check", bad]) == 2
    assert f"{bad}: spec.serveConfigV2: applications.0.args.models.3.evidence.max_active_pairs" in capsys.readouterr().err

    local_dir = _write(tmp_path, "rs-dir.yaml", with_serve_config(
        lambda c: c["applications"][0].update(runtime_env={"working_dir": "."})))
    assert main(["serve", "--check", local_dir]) == 2
    assert f"{local_dir}: spec.serveConfigV2: applications.0.runtime_env" in capsys.readouterr().err

    missing = copy.deepcopy(manifest)
    del missing["spec"]["serveConfigV2"]
    path = _write(tmp_path, "rs-none.yaml", missing)
    assert main(["serve", "--check", path]) == 2
    assert f"{path}: spec.serveConfigV2: missing" in capsys.readouterr().err


def test_check_notes_a_local_working_dir_in_a_plain_config(capsys):
    """cluster-gpu.yaml names working_dir '.', which `serve run` uploads: valid, with a note that a
    RayService or `serve deploy` needs the code another way."""
    assert main(["serve", "--check", str(GPU_CONFIG)]) == 0
    assert "note: prism: runtime_env.working_dir '.'" in capsys.readouterr().out


def test_check_refuses_what_is_not_a_serve_config(tmp_path, capsys):
    for name, doc, needle in [("list.yaml", [1, 2], "expected a mapping"), ("empty.yaml", {"applications": []}, "no 'applications'")]:
        path = _write(tmp_path, name, doc)
        assert main(["serve", "--check", path]) == 2
        assert needle in capsys.readouterr().err
    assert main(["serve", "--check", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.slow
def test_check_through_the_installed_command(tmp_path):
    """The `prism-ray` entry point itself: exit 0 with the summary, exit 2 with the field on stderr."""
    exe = str(Path(sys.executable).with_name("prism-ray"))
    ok = subprocess.run([exe, "serve", "--check", str(RAYSERVICE)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    bad = _write(tmp_path, "bad.yaml", _bad_local(lambda d: d["applications"][0]["args"].update(default_model="nope")))
    proc = subprocess.run([exe, "serve", "--check", bad], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "default_model 'nope'" in proc.stderr and proc.stdout == ""
