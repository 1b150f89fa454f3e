"""`prism-ray serve --check`: validate a Serve config, or a KubeRay RayService's embedded one, without
starting anything.

Two layers, each reported with the path of the field at fault:

- Ray Serve's own schema (`ray.serve.schema.ServeDeploySchema`, what `serve deploy` and KubeRay submit
  to the cluster): application names, route prefixes, deployment options, runtime_env. A plain config
  file may name a local `working_dir` (`serve run` uploads it); a RayService may not, since nothing
  uploads it there, so the same check refuses it inside a manifest.
- Each prism-ray application's `args` as an `AppConfig`: models, tiers, limits (the validation
  `prism-ray serve` and the app builder do).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from prism_ray.config import APP_IMPORT_PATH, AppConfig, ConfigFileError, read_yaml, validated

RAYSERVICE_FIELD = "spec.serveConfigV2"


@dataclass
class CheckedConfig:
    """A validated Serve config and where it came from."""

    source: str  # the file, and the manifest field when it came from a RayService
    serve_config: dict
    apps: dict[str, AppConfig] = field(default_factory=dict)  # prism-ray applications by name
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        lines = [f"OK {self.source}: {len(self.serve_config['applications'])} application(s)"]
        for name, app in self.apps.items():
            models = ", ".join(f"{m.name} ({m.size or '?'}{', evidence' if m.evidence is not None else ''})"
                               for m in app.models)
            lines.append(f"  {name}: {len(app.models)} model(s): {models}; default {app.default_model}")
        return lines + [f"  note: {n}" for n in self.notes]


def serve_config_of(path: str | Path) -> tuple[dict, str, bool]:
    """(the Serve config, where it came from, whether it is a RayService's) for a Serve config file or
    a RayService manifest (its `spec.serveConfigV2` YAML string)."""
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise ConfigFileError(f"{path}: expected a mapping (a Serve config file or a RayService manifest)")
    if doc.get("kind") != "RayService":
        return doc, str(path), False
    embedded = (doc.get("spec") or {}).get("serveConfigV2")
    where = f"{path}: {RAYSERVICE_FIELD}"
    if not isinstance(embedded, str):
        raise ConfigFileError(f"{where}: missing; a RayService's Serve config is a YAML string in {RAYSERVICE_FIELD}")
    import yaml

    try:
        config = yaml.safe_load(embedded)
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{where}: not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(config, dict):
        raise ConfigFileError(f"{where}: expected a Serve config mapping")
    return config, where, True


def _local_dir(uri) -> bool:
    return isinstance(uri, str) and "://" not in uri


def check(path: str | Path) -> CheckedConfig:
    """Validate everything `serve deploy`/`serve run` and the app builder would; ConfigFileError names
    the first bad field."""
    config, where, in_rayservice = serve_config_of(path)
    if not config.get("applications"):
        raise ConfigFileError(f"{where}: no 'applications' list; expected a Serve config")
    result = CheckedConfig(where, config)
    ray_view = copy.deepcopy(config)
    if not in_rayservice:  # `serve run` uploads a local working_dir; Ray's deploy schema only takes URIs
        for app in ray_view["applications"]:
            env = app.get("runtime_env") if isinstance(app, dict) else None
            if isinstance(env, dict) and _local_dir(env.get("working_dir")):
                result.notes.append(f"{app.get('name')}: runtime_env.working_dir {env['working_dir']!r} is a local "
                                    "directory: fine for `serve run`, which uploads it; `serve deploy` and a "
                                    "RayService need a remote URI or an image that holds the code")
                env.pop("working_dir")
    _check_with_ray(ray_view, where)
    for i, app in enumerate(config["applications"]):
        if str(app.get("import_path", "")) == APP_IMPORT_PATH:
            result.apps[app.get("name", f"app{i}")] = validated(AppConfig, app.get("args") or {},
                                                                f"{where}: applications.{i}.args")
    if not result.apps:
        result.notes.append(f"no application imports {APP_IMPORT_PATH}; only Ray's schema was checked")
    return result


def _check_with_ray(config: dict, where: str) -> None:
    """Ray's schema, plus what it lets through silently: a misspelt field (`route_prefx`) is ignored by
    Ray, so an app would quietly serve at the default prefix; here it is an error naming the field."""
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    _unknown_fields(config, ServeDeploySchema, "", where)
    for i, app in enumerate(config.get("applications") or []):
        if isinstance(app, dict):
            _unknown_fields(app, ServeApplicationSchema, f"applications.{i}.", where)
            for j, dep in enumerate(app.get("deployments") or []):
                if isinstance(dep, dict):
                    _unknown_fields(dep, DeploymentSchema, f"applications.{i}.deployments.{j}.", where)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and "-" in p))  # drop union tags
        raise ConfigFileError(f"{where}: {loc}: {first['msg']}" if loc else f"{where}: {first['msg']}") from None


def _unknown_fields(data: dict, schema, prefix: str, where: str) -> None:
    known = set(schema.model_fields) | {f.alias for f in schema.model_fields.values() if f.alias}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise ConfigFileError(f"{where}: {prefix}{unknown[0]}: not a Ray Serve field (Ray would ignore it); "
                              f"expected one of {sorted(known)}")
