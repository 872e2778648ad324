"""cluster.yaml is a real Ray autoscaler config: Ray's own schema and config preparation accept it."""

from __future__ import annotations

import copy
import json
import os
import re

import jsonschema
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(REPO, "cluster.yaml")


@pytest.fixture(scope="module")
def cluster():
    with open(PATH) as f:
        return yaml.safe_load(f)


def _schema():
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def test_valid_against_rays_autoscaler_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cluster, _schema())
    # What `ray up` does before launching anything: merge provider defaults, then validate.
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_is_not_a_no_op(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["worker.gpu"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())


def test_cloud_provider_cpu_head_gpu_workers(cluster):
    assert cluster["provider"]["type"] == "aws"
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    head_family = head["node_config"]["InstanceType"].split(".")[0]
    assert head_family[0] not in "gp" and head.get("resources", {}).get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    gpu = [w for w in workers if w["node_config"]["InstanceType"][0] in "gp"]  # AWS GPU families
    assert gpu and all(w["max_workers"] >= 1 for w in gpu)
    assert "gpu" in cluster["docker"]["worker_image"]


def test_setup_installs_this_package_and_pinned_torch(cluster):
    cmds = "\n".join(cluster["setup_commands"])
    assert re.search(r"pip install .*-e ~/selfcorrect", cmds)
    assert '"torch==' in cmds and "nvidia-smi" in cmds  # CUDA build on GPU nodes only
    assert cluster["file_mounts"]["~/selfcorrect"] == "."


def test_dashboard_not_public_and_token_auth_on(cluster):
    head = "\n".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmds in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in "\n".join(cmds)
    assert "~/.ray/auth_token" in cluster["file_mounts"]


def test_no_secrets_in_the_file():
    text = open(PATH).read()
    patterns = [
        r"AKIA[0-9A-Z]{16}",  # AWS access key id
        r"aws_secret_access_key\s*[:=]",
        r"\bhf_[A-Za-z0-9]{20,}",  # Hugging Face token
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        r"\b[0-9a-f]{64}\b",  # a literal Ray auth token
    ]
    for p in patterns:
        assert not re.search(p, text), p
    assert "ssh_private_key" not in yaml.safe_load(text)["auth"]
