"""Deployment across machines: credentials for a SuperLink and its SuperNodes, and each site's data.

    python -m app.deploy credentials --out creds/ --supernodes 3 --hosts superlink.example.org,10.0.0.5 [--he] [overrides]
        creds/ca.crt                    the CA certificate: every machine and the workstation
        creds/ca.key                    the CA's key (mode 600): keep it offline
        creds/superlink/server.{crt,key} the SuperLink's TLS certificate (the hosts as SANs) and key
        creds/supernode-<i>/auth.key    SuperNode i's node-authentication private key (mode 600)
        creds/supernode-<i>/auth.pub    its public key, registered with `flwr supernode register`
        creds/he/secret.ctx, public.ctx with --he: the HE keys (`app.he_keys provision`), secret
                                        one for the SuperNodes only, public one for the server
    python -m app.deploy export-data --out data/ --supernodes 3 [overrides]
        data/site-<i>.npz: partition i of the configured data set (`x`, `y`), for SuperNode i's
        node config `data-path=...` (a real site names its own file instead)

Why these formats (Flower 1.41, checked against its source):
- The SuperLink serves the Fleet, Control and Runtime APIs on one HTTPS port and needs the CA
  certificate, its certificate and its key (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`).
  With the default `--isolation subprocess` it starts its own `flower-superexec`, which
  connects back through the loopback address (a bind-all address is rewritten to 127.0.0.1),
  so the certificate always carries `localhost` and `127.0.0.1` besides the given hosts.
- Node authentication (`--enable-supernode-auth`) signs every Fleet request with the
  SuperNode's elliptic-curve key: `flower-supernode --auth-supernode-private-key` reads an
  OpenSSH private key, and `flwr supernode register` an OpenSSH public key on a NIST curve.
  P-384 is what Flower's documentation generates.
- Key material is generated with `cryptography` (a Flower dependency) instead of shelling out
  to openssl/ssh-keygen, so the command runs the same wherever Python does.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SUPERLINK_DIR = "superlink"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
AUTH_KEY = "auth.key"
AUTH_PUB = "auth.pub"
HE_DIR = "he"
# Names the SuperLink's own SuperExec uses to reach it (see the module docstring).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
CERT_DAYS = 365

DATA_FILE = "site-{}.npz"


def supernode_dir(out: Path, index: int) -> Path:
    return Path(out) / f"supernode-{index}"


# --------------------------------------------------------------------------- key material
def _write(path: Path, data: bytes, secret: bool) -> Path:
    """Write a file; a secret one is created readable by its owner only (never world-readable,
    not even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a new mode applies only to a new file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(common_name: str = "flower-private-finetune CA"):
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key, ca_cert: x509.Certificate, hosts: list[str]):
    """A TLS server certificate signed by the CA, valid for `hosts` (DNS names or IPs)."""
    names = list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))  # keep order, drop duplicates
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_auth_keys() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key) on P-384, as Flower's node auth reads them."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def write_credentials(
    out: Path, supernodes: int, hosts: list[str], he_overrides: list[str] | None = None
) -> dict[str, Path]:
    """Write every credential of a deployment into `out` (layout: module docstring).
    `he_overrides` (a list, possibly empty) also provisions HE keys from the secagg config."""
    if supernodes < 1:
        raise ValueError(f"--supernodes {supernodes}: a federation needs at least one SuperNode")
    if not hosts or any(not h.strip() for h in hosts):
        raise ValueError(
            f"--hosts {','.join(hosts)!r}: give the SuperLink's hostnames or IP addresses, "
            "comma separated, as SuperNodes and the workstation will dial them"
        )
    he = None
    if he_overrides is not None:  # check the HE parameters before anything is written
        from app.config import load_config, with_option
        from protections.he.config import he_params

        he = he_params(load_config(with_option(he_overrides, "secagg", "he")))
        he.seal_parameters()
        he.check_range()
    out = Path(out)
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, [h.strip() for h in hosts])
    pem = serialization.Encoding.PEM
    paths = {
        "ca_cert": _write(out / CA_CERT, ca_cert.public_bytes(pem), secret=False),
        "ca_key": _write(out / CA_KEY, _pem_key(ca_key), secret=True),
        "server_cert": _write(
            out / SUPERLINK_DIR / SERVER_CERT, server_cert.public_bytes(pem), secret=False
        ),
        "server_key": _write(out / SUPERLINK_DIR / SERVER_KEY, _pem_key(server_key), secret=True),
    }
    for i in range(supernodes):
        private, public = make_node_auth_keys()
        paths[f"supernode_{i}_key"] = _write(supernode_dir(out, i) / AUTH_KEY, private, secret=True)
        paths[f"supernode_{i}_pub"] = _write(supernode_dir(out, i) / AUTH_PUB, public, secret=False)
    if he is not None:
        from protections.he.context import provision

        secret, public = provision(he, out / HE_DIR)
        paths["he_secret"], paths["he_public"] = secret, public
    return paths


# --------------------------------------------------------------------------- site data
def export_site_data(out: Path, supernodes: int, overrides: list[str]) -> list[Path]:
    """Write partition i of the configured data set to out/site-<i>.npz (what SuperNode i
    would hold in simulation), for deployments that test with the project's data sets."""
    import numpy as np

    from app.config import load_config
    from core.data import partition_arrays

    if supernodes < 1:
        raise ValueError(f"--supernodes {supernodes}: export at least one site")
    cfg = load_config(overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(supernodes):
        part = partition_arrays(cfg.dataset, cfg.partitioner, i, supernodes, cfg.seed)
        path = out / DATA_FILE.format(i)
        np.savez(path, x=part.x, y=part.y)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.deploy", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("credentials", help="CA, SuperLink TLS, SuperNode auth keys, HE keys")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--supernodes", type=int, required=True)
    c.add_argument(
        "--hosts", default="localhost",
        help="comma-separated hostnames/IPs of the SuperLink (certificate SANs); "
        "localhost and 127.0.0.1 are always added",
    )  # fmt: skip
    c.add_argument("--he", action="store_true", help="also provision HE keys (secagg=he)")
    c.add_argument("overrides", nargs="*", help="Hydra overrides of the secagg group (with --he)")
    e = commands.add_parser("export-data", help="one data file per SuperNode")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--supernodes", type=int, required=True)
    e.add_argument("overrides", nargs="*", help="Hydra overrides (dataset, partitioner, seed)")
    args = parser.parse_args(argv)
    try:
        if args.command == "credentials":
            if args.overrides and not args.he:
                raise ValueError("overrides only shape the HE keys: add --he, or drop them")
            paths = write_credentials(
                args.out,
                args.supernodes,
                args.hosts.split(","),
                args.overrides if args.he else None,
            )
            for name, path in paths.items():
                print(f"{name}: {path}")
        else:
            for i, path in enumerate(export_site_data(args.out, args.supernodes, args.overrides)):
                print(f"site {i}: {path}")
    except ValueError as err:  # ConfigError and HEError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
