"""The deployment files are checked offline: the DaemonSet against Kubernetes' schemas, the unit by systemd."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.mark.parametrize("version", ["1.30", "1.33"])
@pytest.mark.parametrize("name", ["daemonset.yaml", "engine-example.yaml"])
def test_manifests_are_valid_kubernetes(name: str, version: str) -> None:
    for document in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()):
        kubernetes_validate.validate(document, version, strict=True)


def test_engine_pods_share_only_the_socket_directory() -> None:
    (pod,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "engine-example.yaml").read_text())
    (daemonset,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
    daemon_socket_dir = next(v["hostPath"]["path"] for v in daemonset["spec"]["template"]["spec"]["volumes"]
                             if v["name"] == "socket")
    assert [v["hostPath"]["path"] for v in pod["spec"]["volumes"]] == [daemon_socket_dir]
    assert "hostPID" not in pod["spec"] and "hostIPC" not in pod["spec"]


def test_daemonset_probes_the_tcp_listener_the_daemon_opens() -> None:
    (daemonset,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--listen=0.0.0.0:50051" in container["args"]  # health and reflection only
    assert not any(arg.startswith("--listen-api") for arg in container["args"])
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "weightd.v1.WeightService"}
    assert daemonset["spec"]["updateStrategy"]["type"] == "OnDelete"
    # Descriptors travel over the socket directory: no shared PID or IPC namespace, no privileges.
    assert "hostPID" not in pod and "hostIPC" not in pod
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_daemonset_sees_every_gpu_and_shares_gpu_memory_by_descriptor() -> None:
    (daemonset,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "nvidia.com/gpu" not in str(container.get("resources", {}))  # no slice of the node's GPUs
    # VMM descriptors travel over the socket directory; legacy IPC would need hostPID and hostIPC.
    assert {"--memory=cuda", "--cuda-ipc=vmm"} <= set(container["args"])


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit, mount = tmp_path / "weightd.service", tmp_path / "dev-shm-weightd.mount"
    weightd = Path(sys.executable).parent / "weightd"  # the unit's /usr/local/bin/weightd, as installed here
    source = (DEPLOY / "systemd" / "weightd.service").read_text()
    unit.write_text(source.replace("/usr/local/bin/weightd", str(weightd)))
    shutil.copy(DEPLOY / "systemd" / mount.name, mount)
    result = subprocess.run(["systemd-analyze", "verify", str(unit), str(mount)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_arenas_get_a_tmpfs_of_huge_pages_wherever_the_daemon_is_deployed() -> None:
    mount = (DEPLOY / "systemd" / "dev-shm-weightd.mount").read_text()
    where = next(line.split("=", 1)[1] for line in mount.splitlines() if line.startswith("Where="))
    assert "huge=within_size" in next(line for line in mount.splitlines() if line.startswith("Options="))
    service = (DEPLOY / "systemd" / "weightd.service").read_text()
    assert f"--shm-dir {where}" in service and f"RequiresMountsFor={where}" in service
    (daemonset,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert f"--shm-dir={where}" in container["args"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["hostPath"]["path"] == where  # the node's mount of that unit, when the node has one
    assert {"name": "shm", "mountPath": where} in container["volumeMounts"]


def test_daemon_tells_systemd_it_is_ready_and_stopping(daemon_factory, tmp_path: Path) -> None:
    """The unit is Type=notify: READY=1 once serving, STOPPING=1 on SIGTERM, over $NOTIFY_SOCKET."""
    import socket

    address = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(address))
        listener.settimeout(30)
        daemon = daemon_factory({"NOTIFY_SOCKET": str(address)})
        assert listener.recv(256) == b"READY=1"
        daemon.stop()
        assert listener.recv(256) == b"STOPPING=1"


def test_daemonset_serves_metrics_where_its_scrape_annotations_point() -> None:
    (daemonset,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
    template = daemonset["spec"]["template"]
    (container,) = template["spec"]["containers"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert f"--metrics-listen=0.0.0.0:{annotations['prometheus.io/port']}" in container["args"]
    assert {"name": "metrics", "containerPort": int(annotations["prometheus.io/port"]), "protocol": "TCP"} in \
        container["ports"]
