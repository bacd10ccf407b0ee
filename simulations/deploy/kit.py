"""On-premise deployment helpers: certificates, SuperNode keys, the Flower connection, launch commands.

Two roles (docs/DEPLOY.md):

* the **operator** runs one SuperLink (one HTTPS port: Fleet, Control and Runtime APIs) and the
  ServerApp, which writes RUN_DIR on the coordinator host;
* each **partner** runs one SuperNode beside its encrypted tenant folder; the ClientApp reads the
  folder, its key and its state dir from ``--node-config`` (``tenant-dir``, ``key-file``, ``state-dir``).

Operator layout written by :func:`init_deployment` (``DEPLOY_DIR``)::

    deploy.json                 the settings below (public)
    ca/ca.pem                   CA certificate: every partner gets a copy (--root-certificates)
    ca/ca.key                   CA private key, 0600: keep it offline, it signs SuperLink certificates
    superlink/server.pem|.key   the SuperLink's TLS certificate (SANs from --san) and key (0600)
    superlink/state.db          SuperLink --database (runs, registered nodes survive a restart)
    flwr-home/config.toml       Flower connection [superlink.<name>] (address, root-certificates)
    partners/<name>/auth.pub    each partner's SuperNode public key (OpenSSH, ECDSA P-384)
    scripts/*.sh                the exact commands (superlink, register, run, status)

Partner layout written by :func:`init_partner` (``PARTNER_DIR``, on the partner's machine)::

    partner.json                settings; auth.key (0600) + auth.key.pub; ca.pem; supernode.sh

Everything here is plain functions over paths and strings (tests call them); ``fedrec.simulations.cli.deploy``
wraps them as ``fedrec deploy …``. Process control (launching ``flwr run``, waiting for a run with a
timeout) shells out to Flower's own CLIs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrec.shared_model.errors import FedrecError

DEPLOY_FORMAT = "fedrec-deploy"
DEPLOY_FILE = "deploy.json"
PARTNER_FILE = "partner.json"
CONNECTION = "fedrec"
DEFAULT_PORT = 9093  # SuperLink (one port for Fleet, Control and Runtime APIs); `fedrec serve` uses 8000
DEFAULT_NODE_PORT = 9094  # a SuperNode's local Runtime API (ClientApp processes); distinct per host
CURVE = ec.SECP384R1()

#: Environment every Flower process of a deployment gets (DESIGN.md): no runtime ``uv sync`` of app
#: dependencies (it would install torch + CUDA), no telemetry, no update check.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_HOST_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


# ------------------------------------------------------------------ validation
def check_name(name: str, what: str = "partner name") -> str:
    if not _NAME_RE.fullmatch(name):
        raise FedrecError(f"{what} must be lowercase letters, digits, '-' or '_' (≤ 63), got {name!r}")
    return name


def check_port(port: int, what: str = "port") -> int:
    if not 1 <= port <= 65535:
        raise FedrecError(f"{what} must be in 1..65535, got {port}")
    return port


def parse_san(value: str) -> x509.GeneralName:
    """One subjectAltName: an IPv4/IPv6 address or a DNS name (a leading ``*.`` wildcard allowed)."""
    text = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _HOST_RE.fullmatch(text) or "*" in text[2:] or ("*" in text and not text.startswith("*.")):
        raise FedrecError(f"--san must be an IP address or a DNS name, got {value!r}")
    return x509.DNSName(text.lower())


def server_sans(sans: Sequence[str]) -> list[str]:
    """The SANs of the SuperLink certificate: the given ones plus ``localhost`` and ``127.0.0.1``.

    The loopback names are always added: the SuperLink starts its ServerApp runtime (SuperExec) as a
    local process that connects back to the SuperLink's own port over TLS and checks this certificate.
    """
    out: list[str] = []
    for s in [*sans, "localhost", "127.0.0.1"]:
        parse_san(s)
        key = s.strip().lower()
        if key not in out:
            out.append(key)
    return out


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) → (host, port); one-line error otherwise."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", address.strip())
    if not m:
        raise FedrecError(f"address must look like host:port, got {address!r}")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return host, check_port(int(port))


# ------------------------------------------------------------------ keys and certificates
def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "fedrec deployment CA", days: int = 1825) -> tuple[bytes, bytes]:
    """A self-signed CA (ECDSA P-384): (key PEM, certificate PEM)."""
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return _pem_key(key), _pem_cert(cert)


def make_server_cert(
    ca_key_pem: bytes, ca_cert_pem: bytes, sans: Sequence[str], days: int = 365
) -> tuple[bytes, bytes]:
    """The SuperLink's TLS certificate signed by the CA, with ``sans`` (see :func:`server_sans`)."""
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise FedrecError("the CA key is not an ECDSA key")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    names = [parse_san(s) for s in sans]
    if not names:
        raise FedrecError("the SuperLink certificate needs at least one --san")
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    cn = str(names[0].value)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return _pem_key(key), _pem_cert(cert)


def make_auth_keypair(comment: str = "") -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair, ECDSA P-384, both halves in OpenSSH format.

    ``flower-supernode --auth-supernode-private-key`` loads the private half with
    ``load_ssh_private_key``; ``flwr supernode register`` loads the public half with
    ``load_ssh_public_key`` and accepts NIST curves only.
    """
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode()
    return private, public + b"\n"


def load_auth_public_key(path: Path) -> bytes:
    """Read and check a partner's public key (OpenSSH, ECDSA on a NIST curve); returns its bytes."""
    if not path.is_file():
        raise FedrecError(f"public key {path} not found")
    data = path.read_bytes().strip()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise FedrecError(f"{path} is not an OpenSSH public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise FedrecError(f"{path} must be an ECDSA key on a NIST curve (P-384 recommended)")
    return data + b"\n"


def key_fingerprint(public_openssh: bytes) -> str:
    """SHA-256 fingerprint of an OpenSSH public key, as ``ssh-keygen -lf`` prints it."""
    import base64
    import hashlib

    blob = base64.b64decode(public_openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _write_script(path: Path, lines: Sequence[str]) -> None:
    _write(path, ("#!/usr/bin/env bash\nset -euo pipefail\n" + "\n".join(lines) + "\n").encode(), 0o755)


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class DeploySettings:
    """What the operator chose; stored as deploy.json (public: no key material)."""

    address: str  # how partners and the CLI reach the SuperLink, host:port (a SAN of its certificate)
    host: str = "0.0.0.0"  # the SuperLink binds here
    port: int = DEFAULT_PORT
    sans: list[str] = field(default_factory=list)
    app_dir: str = ""  # the fedrec checkout `flwr run` packages (absolute)
    flower_bin: str = ""  # folder of flower-superlink / flwr (default: beside this Python)
    partners: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": DEPLOY_FORMAT, "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeploySettings:
        if data.get("format") != DEPLOY_FORMAT:
            raise FedrecError(f"not a fedrec deployment file (format {data.get('format')!r})")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True)
class Deployment:
    """Paths of an operator's DEPLOY_DIR (see the module docstring)."""

    root: Path

    @property
    def settings_file(self) -> Path:
        return self.root / DEPLOY_FILE

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    @property
    def database(self) -> Path:
        return self.root / "superlink" / "state.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def scripts(self) -> Path:
        return self.root / "scripts"

    def partner_pub(self, name: str) -> Path:
        return self.root / "partners" / name / "auth.pub"

    def settings(self) -> DeploySettings:
        if not self.settings_file.is_file():
            raise FedrecError(
                f"{self.root} is not a deployment folder (no {DEPLOY_FILE}; run `fedrec deploy init`)"
            )
        return DeploySettings.from_json(json.loads(self.settings_file.read_text(encoding="utf-8")))

    def env(self, flower_bin: str = "") -> dict[str, str]:
        """Environment for the operator's Flower processes (SuperLink, flwr CLI)."""
        return flower_env(self.flwr_home, flower_bin)


def default_flower_bin() -> str:
    return str(Path(sys.executable).parent)


def flower_env(flwr_home: Path, flower_bin: str = "") -> dict[str, str]:
    """:data:`FLOWER_ENV` + a fresh ``FLWR_HOME`` + ``PATH`` led by the Flower binaries' folder (the
    SuperLink and SuperNodes start ``flower-superexec`` / ``flwr-serverapp`` / ``flwr-clientapp`` by name).
    """
    path = os.pathsep.join([flower_bin or default_flower_bin(), os.environ.get("PATH", "/usr/bin:/bin")])
    return {**FLOWER_ENV, "FLWR_HOME": str(flwr_home), "PATH": path}


def _bin(settings_bin: str, name: str) -> str:
    return str(Path(settings_bin or default_flower_bin()) / name)


# ------------------------------------------------------------------ commands (argv lists)
def superlink_command(dep: Deployment, s: DeploySettings) -> list[str]:
    return [
        _bin(s.flower_bin, "flower-superlink"),
        "--ssl-ca-certfile",
        str(dep.ca_cert),
        "--ssl-certfile",
        str(dep.server_cert),
        "--ssl-keyfile",
        str(dep.server_key),
        "--enable-supernode-auth",
        "--database",
        str(dep.database),
        "--host",
        s.host,
        "--port",
        str(s.port),
        "--disable-runtime-dependency-installation",
    ]


def register_command(dep: Deployment, s: DeploySettings, partner: str) -> list[str]:
    return [
        _bin(s.flower_bin, "flwr"),
        "supernode",
        "register",
        str(dep.partner_pub(partner)),
        CONNECTION,
        "--name",
        partner,
        "--format",
        "json",
    ]


def node_config_string(tenant_dir: str | Path, key_file: str | Path, state_dir: str | Path) -> str:
    """The ``--node-config`` value: absolute paths, TOML-quoted (``"`` and ``\\`` are refused)."""
    parts = []
    for key, value in (("tenant-dir", tenant_dir), ("key-file", key_file), ("state-dir", state_dir)):
        path = Path(value)
        if not path.is_absolute():
            raise FedrecError(f"--{key} must be an absolute path, got {value}")
        if any(c in str(path) for c in '"\\\n'):
            raise FedrecError(f"--{key} must not contain quotes, backslashes or newlines: {value}")
        parts.append(f'{key}="{path}"')
    return " ".join(parts)


def supernode_command(
    *,
    superlink: str,
    ca_cert: Path,
    auth_key: Path | None,
    node_config: str,
    port: int = DEFAULT_NODE_PORT,
    flower_bin: str = "",
    max_wait_time: float | None = 300.0,
) -> list[str]:
    """``flower-supernode`` over TLS with node authentication (``auth_key`` None: none, for tests)."""
    cmd = [
        _bin(flower_bin, "flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca_cert),
    ]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    cmd += ["--node-config", node_config, "--port", str(check_port(port, "--node-port"))]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", f"{max_wait_time:g}"]
    return cmd


def run_command(dep: Deployment, s: DeploySettings, run_config: Path, *, stream: bool = False) -> list[str]:
    """``flwr run APP fedrec --run-config FILE --format json`` (prints the run id as JSON)."""
    cmd = [_bin(s.flower_bin, "flwr"), "run", s.app_dir or ".", CONNECTION, "--run-config", str(run_config)]
    return [*cmd, "--stream"] if stream else [*cmd, "--format", "json"]


def ls_command(s: DeploySettings, run_id: int | None = None) -> list[str]:
    cmd = [_bin(s.flower_bin, "flwr"), "ls", CONNECTION, "--format", "json"]
    return [*cmd, "--run-id", str(run_id)] if run_id is not None else cmd


def env_lines(env: Mapping[str, str]) -> list[str]:
    """``export`` lines; PATH keeps the caller's PATH after the Flower folder."""
    out = []
    for k, v in env.items():
        if k == "PATH":
            out.append(f'export PATH={shlex.quote(v.split(os.pathsep)[0])}:"$PATH"')
        else:
            out.append(f"export {k}={shlex.quote(v)}")
    return out


def connection_toml(address: str, root_certificates: Path) -> str:
    """``$FLWR_HOME/config.toml`` with the deployment's connection as the default."""
    if not root_certificates.is_absolute():
        raise FedrecError(f"root-certificates must be absolute (Flower requires it), got {root_certificates}")
    return (
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{address}"\n'
        f'root-certificates = "{root_certificates}"\n'
        "insecure = false\n"
    )


# ------------------------------------------------------------------ run configuration
#: a deployed run's default ``rejoin-wait`` (s): before each round, wait this long for a partner whose
#: SuperNode died to come back. Its restart is refused until the SuperLink lists it offline (no
#: heartbeat for 60 s, fixed in Flower), so a supervisor brings it back 60–100 s after the crash
#: (systemd ``RestartSec=30``, ``Restart=always``: refused once, then accepted); a partner that is gone
#: for good costs each round this long at most. ``--set rejoin-wait=0`` turns it off.
DEPLOY_REJOIN_WAIT = 150.0


#: run-config keys a deployment always sets itself (everything else may be passed with --set).
def deployment_run_config(
    *,
    run_dir: Path,
    catalog: Path,
    tenants: int,
    rounds: int,
    run_name: str,
    max_weight: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run config of a deployed run: DP and SecAgg+ on; absolute coordinator paths; partners that
    drop out are waited for before each round (``rejoin-wait``, :data:`DEPLOY_REJOIN_WAIT` unless set).

    ``max_weight`` bounds the largest partner's user count (SecAgg+ scales each delta by
    users / max_weight; the coordinator has no manifests to read it from).
    """
    for what, path in (("--run-dir", run_dir), ("--catalog", catalog)):
        if not path.is_absolute():
            raise FedrecError(f"{what} must be an absolute path on the coordinator, got {path}")
    if not catalog.is_file():
        raise FedrecError(f"catalogue {catalog} not found (copy FED_DIR/catalog.json to the coordinator)")
    if tenants < 2:
        raise FedrecError(f"a deployment with SecAgg+ needs at least 2 partners, got {tenants}")
    if max_weight < 1:
        raise FedrecError(f"--max-users must be >= 1, got {max_weight}")
    config: dict[str, Any] = {
        "num-server-rounds": rounds,
        "catalog": str(catalog),
        "run-dir": str(run_dir),
        "run-name": check_name(run_name, "run name"),
        "num-tenants": tenants,
        "min-tenants": tenants,
        "dp": True,
        "secagg": True,
        "secagg-max-weight": float(max_weight),
        "rejoin-wait": DEPLOY_REJOIN_WAIT,
    }
    for key, value in (extra or {}).items():
        config[key] = value
    from fedrec.shared_model.runconfig import RunConfig

    RunConfig.from_mapping(config)  # validates names and values (one-line FedrecError)
    return config


def resume_point(run_dir: Path, run_name: str, rounds: int) -> int:
    """The last round RUN_DIR checkpointed, for ``deploy launch --resume``; one-line error when there
    is nothing to resume (no checkpoint, another run name, every round done)."""
    ck = run_dir / "checkpoint"
    try:
        done = int(json.loads((ck / "round.json").read_text(encoding="utf-8"))["round"])
        saved = json.loads((ck / "model.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, KeyError, TypeError):
        raise FedrecError(
            f"{run_dir} has no checkpoint to resume from (no round finished); launch it again without --resume"
        ) from None
    if saved is not None and saved != run_name:
        raise FedrecError(
            f"{run_dir} belongs to run name {saved!r}, not {run_name!r}: pass --run-name {saved}"
        )
    if done >= rounds:
        raise FedrecError(f"{run_dir} already has {done} of {rounds} round(s): nothing to resume")
    return done


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=VALUE`` (VALUE in TOML: 3, 0.5, true, "text") → a mapping."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FedrecError(f"--set must look like key=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare word: a string
    return out


def run_config_toml(config: Mapping[str, Any]) -> str:
    lines = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ operator: init
def init_deployment(
    root: Path,
    *,
    address: str,
    sans: Sequence[str] = (),
    host: str = "0.0.0.0",
    port: int | None = None,
    partners: Sequence[str] = (),
    app_dir: Path | None = None,
    flower_bin: str = "",
    days: int = 365,
    overwrite: bool = False,
) -> DeploySettings:
    """Create DEPLOY_DIR: CA, SuperLink certificate, connection config, partner keys, scripts.

    ``partners`` get a key pair made here (operator-provisioned: hand ``partners/<name>/auth.key``
    over securely, then delete it); partners that make their own key use ``fedrec deploy partner``
    and send only the public key (``fedrec deploy add-partner``).
    """
    root = root.absolute()
    dep = Deployment(root)
    if dep.settings_file.exists() and not overwrite:
        raise FedrecError(f"{root} already holds a deployment; pass --overwrite to replace its certificates")
    sl_host, sl_port = split_address(address)
    port = check_port(port if port is not None else sl_port)
    all_sans = server_sans([sl_host, *sans])
    for p in partners:
        check_name(p)
    app = (app_dir or Path.cwd()).absolute()
    if not (app / "pyproject.toml").is_file():
        raise FedrecError(f"--app-dir {app} has no pyproject.toml (it must be the fedrec checkout)")
    ca_key, ca_cert = make_ca(days=max(days, 365) * 5)
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, all_sans, days=days)
    _write(dep.ca_key, ca_key, 0o600)
    _write(dep.ca_cert, ca_cert)
    _write(dep.server_key, srv_key, 0o600)
    _write(dep.server_cert, srv_cert)
    _write(dep.flwr_home / "config.toml", connection_toml(address, dep.ca_cert).encode())
    for p in partners:
        private, public = make_auth_keypair(comment=f"fedrec-{p}")
        _write(root / "partners" / p / "auth.key", private, 0o600)
        _write(dep.partner_pub(p), public)
    settings = DeploySettings(
        address=address,
        host=host,
        port=port,
        sans=all_sans,
        app_dir=str(app),
        flower_bin=flower_bin,
        partners=sorted(set(partners)),
    )
    save_settings(dep, settings)
    return settings


def save_settings(dep: Deployment, settings: DeploySettings) -> None:
    _write(dep.settings_file, (json.dumps(settings.to_json(), indent=1) + "\n").encode())
    write_operator_scripts(dep, settings)


def add_partner(dep: Deployment, name: str, public_key: Path) -> DeploySettings:
    """Store a partner's public key (sent by the partner) and list it for registration."""
    check_name(name)
    data = load_auth_public_key(public_key)
    settings = dep.settings()
    _write(dep.partner_pub(name), data)
    partners = sorted({*settings.partners, name})
    new = DeploySettings(**{**asdict(settings), "partners": partners})
    save_settings(dep, new)
    return new


def write_operator_scripts(dep: Deployment, s: DeploySettings) -> None:
    env = env_lines(dep.env(s.flower_bin))
    _write_script(
        dep.scripts / "superlink.sh",
        [
            "# Start the SuperLink: TLS, SuperNode authentication, persistent state.",
            "# Stop: SIGTERM to its PID.",
            *env,
            "exec " + shlex.join(superlink_command(dep, s)),
        ],
    )
    _write_script(
        dep.scripts / "register.sh",
        [
            "# Register every partner's public key (once per key; kept in the SuperLink's --database).",
            *env,
            *(shlex.join(register_command(dep, s, p)) for p in s.partners),
        ],
    )
    _write_script(
        dep.scripts / "run.sh",
        [
            "# Launch a run: scripts/run.sh RUN_CONFIG.toml (`fedrec deploy launch --dry-run` writes one).",
            '# Prints {"success": …, "run-id": …}; then `scripts/status.sh RUN_ID`.',
            *env,
            "exec " + shlex.join(run_command(dep, s, Path("RUNCONFIG"))).replace("RUNCONFIG", '"$1"'),
        ],
    )
    _write_script(
        dep.scripts / "status.sh",
        [
            "# Status of a run (finished:completed is success; `flwr run` exits 0 even on failure).",
            *env,
            "exec " + shlex.join(ls_command(s)) + ' --run-id "$1"',
        ],
    )


# ------------------------------------------------------------------ partner side
@dataclass(frozen=True)
class PartnerSettings:
    name: str
    superlink: str  # host:port of the SuperLink
    tenant_dir: str
    key_file: str
    state_dir: str
    node_port: int = DEFAULT_NODE_PORT
    flower_bin: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": "fedrec-partner", "version": 1, **asdict(self)}


def partner_command(root: Path, p: PartnerSettings) -> list[str]:
    return supernode_command(
        superlink=p.superlink,
        ca_cert=root / "ca.pem",
        auth_key=root / "auth.key",
        node_config=node_config_string(p.tenant_dir, p.key_file, p.state_dir),
        port=p.node_port,
        flower_bin=p.flower_bin,
    )


def partner_env(root: Path, flower_bin: str = "") -> dict[str, str]:
    return flower_env(root / "flwr-home", flower_bin)


def init_partner(
    root: Path,
    *,
    name: str,
    superlink: str,
    ca_cert: Path,
    tenant_dir: Path,
    key_file: Path,
    state_dir: Path,
    node_port: int = DEFAULT_NODE_PORT,
    flower_bin: str = "",
    new_key: bool = False,
) -> PartnerSettings:
    """A partner's SuperNode folder: its own auth key pair (kept if present unless ``new_key``), the CA
    certificate, ``supernode.sh``. Only ``auth.key.pub`` goes to the operator."""
    root = root.absolute()
    check_name(name)
    split_address(superlink)
    if not ca_cert.is_file():
        raise FedrecError(f"CA certificate {ca_cert} not found (the operator's DEPLOY_DIR/ca/ca.pem)")
    try:
        x509.load_pem_x509_certificate(ca_cert.read_bytes())
    except ValueError:
        raise FedrecError(f"{ca_cert} is not a PEM certificate") from None
    if not (tenant_dir / "partition.enc").is_file():
        raise FedrecError(f"{tenant_dir} is not a tenant folder (no partition.enc; made by `fedrec prepare`)")
    if not key_file.is_file():
        raise FedrecError(f"tenant key {key_file} not found")
    p = PartnerSettings(
        name=name,
        superlink=superlink,
        tenant_dir=str(tenant_dir.absolute()),
        key_file=str(key_file.absolute()),
        state_dir=str(state_dir.absolute()),
        node_port=check_port(node_port, "--node-port"),
        flower_bin=flower_bin,
    )
    node_config_string(p.tenant_dir, p.key_file, p.state_dir)  # validates
    root.mkdir(parents=True, exist_ok=True)
    key = root / "auth.key"
    if new_key and key.exists():
        stamp = time.strftime("%Y%m%dT%H%M%S")
        (root / "retired").mkdir(exist_ok=True)
        for suffix in ("", ".pub"):
            old = root / f"auth.key{suffix}"
            if old.exists():
                os.replace(old, root / "retired" / f"auth.key{suffix}.{stamp}")
    if not key.exists():
        private, public = make_auth_keypair(comment=f"fedrec-{name}")
        _write(key, private, 0o600)
        _write(root / "auth.key.pub", public)
    shutil.copyfile(ca_cert, root / "ca.pem")
    Path(p.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(root / PARTNER_FILE, (json.dumps(p.to_json(), indent=1) + "\n").encode())
    _write_script(
        root / "supernode.sh",
        [
            "# Start this partner's SuperNode (TLS + node authentication). Stop: kill its PID (SIGTERM).",
            *env_lines(partner_env(root, p.flower_bin)),
            "exec " + shlex.join(partner_command(root, p)),
        ],
    )
    return p


# ------------------------------------------------------------------ run control (timeouts everywhere)
class FlowerCommandError(FedrecError):
    """A Flower CLI call failed; the message carries its last line."""


def parse_json_output(stdout: str) -> dict[str, Any] | None:
    """The JSON object a Flower CLI printed with ``--format json`` (pretty-printed, possibly after
    other lines); None when there is none."""
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"(?m)^\{", stdout)]
    for start in starts:
        try:
            obj, _end = decoder.raw_decode(stdout, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def flwr_json(cmd: Sequence[str], env: Mapping[str, str], timeout: float = 60.0) -> dict[str, Any]:
    """Run a Flower CLI command with ``--format json``; return its JSON (the last ``{`` line)."""
    try:
        proc = subprocess.run(
            list(cmd), env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise FlowerCommandError(
            f"{Path(cmd[0]).name} {cmd[1]} did not answer within {timeout:g} s"
        ) from None
    data = parse_json_output(proc.stdout)
    if data is not None:
        return data
    text = (proc.stderr or proc.stdout).strip().splitlines()
    raise FlowerCommandError(
        f"{Path(cmd[0]).name} {cmd[1]} failed (exit {proc.returncode}): {text[-1] if text else 'no output'}"
    )


def launch_run(dep: Deployment, run_config: Path, timeout: float = 120.0) -> int:
    """``flwr run`` the app with ``run_config``; the run id."""
    s = dep.settings()
    out = flwr_json(run_command(dep, s, run_config), dep.env(s.flower_bin), timeout=timeout)
    if not out.get("success") or out.get("run-id") is None:
        raise FlowerCommandError(f"flwr run did not start a run: {out.get('error-message', out)}")
    return int(out["run-id"])


def run_status(dep: Deployment, run_id: int, timeout: float = 60.0) -> str:
    s = dep.settings()
    out = flwr_json(ls_command(s, run_id), dep.env(s.flower_bin), timeout=timeout)
    runs = out.get("runs") or []
    if not out.get("success") or not runs:
        raise FlowerCommandError(f"flwr ls knows no run {run_id}: {out.get('error-message', out)}")
    return str(runs[0]["status"])


def wait_for_run(dep: Deployment, run_id: int, timeout: float, *, poll: float = 5.0, log: Any = None) -> str:
    """Poll ``flwr ls`` until the run is ``finished:*`` or ``timeout`` seconds pass; the last status."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            status = run_status(dep, run_id)
        except FlowerCommandError as e:  # SuperLink briefly unreachable: keep waiting until the deadline
            status = f"unknown ({e})"
        if status != last and log is not None:
            log(f"run {run_id}: {status}")
        last = status
        if status.startswith("finished:"):
            return status
        if time.monotonic() >= deadline:
            raise FedrecError(f"run {run_id} not finished within {timeout:g} s (last status: {status})")
        time.sleep(poll)


__all__ = [
    "CONNECTION",
    "DEFAULT_NODE_PORT",
    "DEFAULT_PORT",
    "DEPLOY_REJOIN_WAIT",
    "FLOWER_ENV",
    "DeploySettings",
    "Deployment",
    "PartnerSettings",
    "add_partner",
    "connection_toml",
    "deployment_run_config",
    "init_deployment",
    "init_partner",
    "launch_run",
    "make_auth_keypair",
    "make_ca",
    "make_server_cert",
    "node_config_string",
    "register_command",
    "resume_point",
    "run_status",
    "superlink_command",
    "supernode_command",
    "wait_for_run",
]
