"""Validates rendered Kubernetes manifests offline (run by infra/k8s-check.sh).

Reads the multi-document YAML that `kustomize build` printed, from the files named on the
command line, and checks every object:

- built-in kinds against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships,
  in strict mode (an unknown field is an error, as with the API server's strict field
  validation);
- custom resources against the JSON schemas kept in k8s/schemas/ (a kind with no schema
  there is an error, so a new custom resource cannot slip through unchecked);
- what no schema sees: every ConfigMap and Secret a pod uses, every Deployment an HPA scales
  and every pod set a Service or PodDisruptionBudget selects exists in the same rendering,
  and the gateway's termination grace period covers its preStop sleep plus
  gateway.drain_secs from the rendered parley.toml;
- every rendered nats.conf fsyncs every write (`sync_interval: always`: an acknowledged
  append must survive a crash) and, given --nats-server, passes `nats-server -t`.

Prints one line per problem and exits 1 if there is any.
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import tomllib

import jsonschema
import kubernetes_validate
import yaml

DRAIN_SECS_DEFAULT = 10  # gateway.drain_secs when parley.toml leaves it out
STOP_MARGIN_SECS = 5  # time the process gets to stop after the drain


def load_schemas(directory):
    """Custom resource schemas by (apiVersion, kind), read from their `const` values."""
    schemas = {}
    for path in sorted(pathlib.Path(directory).glob("*.yaml")):
        schema = yaml.safe_load(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        props = schema["properties"]
        schemas[(props["apiVersion"]["const"], props["kind"]["const"])] = schema
    return schemas


def schema_problems(obj, k8s_version, schemas):
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in schemas:
        validator = jsonschema.Draft202012Validator(schemas[key])
        return [
            f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key[1]} {key[0]}: add one to k8s/schemas/ if it is a custom resource"]
    except kubernetes_validate.ValidationError as e:
        # kubernetes-validate stops at the first error and copies jsonschema's into its own.
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"]
    return []


def pod_templates(objects):
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj, obj["spec"]["template"]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def reference_problems(objects):
    """References between objects of one rendering that no schema can check."""
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    problems = []
    for owner, template in pod_templates(objects):
        spec = template["spec"]
        refs = [("ConfigMap", v["configMap"]["name"]) for v in spec.get("volumes", []) if "configMap" in v]
        refs += [("Secret", v["secret"]["secretName"]) for v in spec.get("volumes", []) if "secret" in v]
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "secretKeyRef" in source:
                    refs.append(("Secret", source["secretKeyRef"]["name"]))
                if "configMapKeyRef" in source:
                    refs.append(("ConfigMap", source["configMapKeyRef"]["name"]))
        for ref in refs:
            if ref not in names:
                problems.append((owner, f"uses {ref[0]} {ref[1]}, which is not in the rendering"))
    labels = [t["metadata"].get("labels", {}) for _, t in pod_templates(objects)]
    for obj in objects:
        selector = None
        if obj["kind"] == "Service":
            selector = obj["spec"].get("selector")
        elif obj["kind"] == "PodDisruptionBudget":
            selector = obj["spec"]["selector"].get("matchLabels")
        elif obj["kind"] == "HorizontalPodAutoscaler":
            target = obj["spec"]["scaleTargetRef"]
            if (target["kind"], target["name"]) not in names:
                problems.append((obj, f"scales {target['kind']} {target['name']}, which is not in the rendering"))
        if selector and not any(matches(selector, pod) for pod in labels):
            problems.append((obj, f"selects no pod template: {selector}"))
    return problems


def drain_problems(objects):
    """The gateway must get SIGTERM only after its preStop, and be killed only after draining."""
    configs = [o for o in objects if o["kind"] == "ConfigMap" and "parley.toml" in o.get("data", {})]
    problems = []
    for owner, template in pod_templates(objects):
        spec = template["spec"]
        for container in spec["containers"]:
            if "gateway" not in container.get("args", []):
                continue
            mounted = {v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
            toml = [tomllib.loads(c["data"]["parley.toml"]) for c in configs if c["metadata"]["name"] in mounted]
            drain = DRAIN_SECS_DEFAULT
            if toml:
                drain = toml[0].get("gateway", {}).get("drain_secs", DRAIN_SECS_DEFAULT)
            for env in container.get("env", []):
                if env["name"] == "PARLEY_GATEWAY__DRAIN_SECS":
                    drain = int(env["value"])
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            grace = spec.get("terminationGracePeriodSeconds", 30)
            needed = pre_stop + drain + STOP_MARGIN_SECS
            if grace < needed:
                problems.append((owner, f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + "
                                        f"gateway.drain_secs {drain} + {STOP_MARGIN_SECS}: sockets are killed mid-drain"))
    return problems


def nats_config_problems(objects, nats_server):
    problems = []
    for obj in objects:
        conf = obj.get("data", {}).get("nats.conf") if obj["kind"] == "ConfigMap" else None
        if conf is None:
            continue
        if not re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.MULTILINE):
            problems.append((obj, "nats.conf lacks `sync_interval: always` in its jetstream block"))
        if nats_server:
            with tempfile.NamedTemporaryFile("w", suffix=".conf") as file:
                file.write(conf)
                file.flush()
                env = dict(os.environ, POD_NAME="nats-0")  # the StatefulSet sets it
                run = subprocess.run([nats_server, "-t", "-c", file.name], env=env, capture_output=True, text=True)
            if run.returncode != 0:
                problems.append((obj, f"nats-server -t refuses nats.conf: {run.stderr.strip()}"))
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--schemas", required=True, help="directory of custom resource schemas")
    parser.add_argument("--nats-server", help="a nats-server binary to test nats.conf with")
    parser.add_argument("rendered", nargs="+", help="files printed by kustomize build")
    args = parser.parse_args()
    schemas = load_schemas(args.schemas)
    failed = 0
    for path in args.rendered:
        objects = [o for o in yaml.safe_load_all(pathlib.Path(path).read_text()) if o]
        if not objects:
            print(f"{path}: no objects")
            failed += 1
            continue
        problems = []
        for obj in objects:
            problems += [(obj, p) for p in schema_problems(obj, args.kubernetes_version, schemas)]
        problems += reference_problems(objects) + drain_problems(objects)
        problems += nats_config_problems(objects, args.nats_server)
        for obj, problem in problems:
            print(f"{path}: {obj.get('kind')} {obj.get('metadata', {}).get('name')}: {problem}")
        failed += len(problems)
        print(f"{path}: {len(objects)} objects, {len(problems)} problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
