"""CurveZMQ keys: who may talk to a worker, and encryption of everything between them.

`disagg keys generate DIR` writes one key pair per role (coordinator, prefill, decode, colocated)
and copies each public key into `DIR/allowed/`. A process started with `--keys DIR`:
- as a server (every worker's ROUTER) uses its role's secret key and accepts only clients whose
  public key is in `DIR/allowed/` (checked by zmq's ZAP authenticator; a stranger's handshake
  fails, so not one of its bytes reaches the worker);
- as a client (a coordinator, or a prefill worker connecting to a decode worker) uses its role's
  key pair and expects the server's public key `DIR/<server role>.key`.
To admit another machine's coordinator, copy its `coordinator.key` into `allowed/` as any name.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from disagg_cli.errors import UsageError
from disagg_cli.protocol import PEER_ROLES


def generate_keys(directory: Path) -> list[Path]:
    """Key pairs for every role, public keys copied into `allowed/`; refuses to overwrite."""
    allowed = directory / "allowed"
    if any((directory / f"{r}.key_secret").exists() for r in PEER_ROLES):
        raise UsageError(f"{directory} already holds keys; remove them first or pick another folder")
    allowed.mkdir(parents=True, exist_ok=True)
    written = []
    for role in PEER_ROLES:
        public, secret = zmq.auth.create_certificates(str(directory), role)
        shutil.copy(public, allowed / f"{role}.key")
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written


@dataclass(frozen=True, slots=True)
class Keys:
    directory: Path
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, directory: Path, role: str) -> Keys:
        secret_file = directory / f"{role}.key_secret"
        if not secret_file.is_file():
            raise UsageError(f"--keys {directory}: no {secret_file.name}; create keys with `disagg keys generate DIR`")
        public, secret = zmq.auth.load_certificate(str(secret_file))
        assert secret is not None
        return cls(directory, public, secret)

    def server_public(self, role: str) -> bytes:
        path = self.directory / f"{role}.key"
        if not path.is_file():
            raise UsageError(f"--keys {self.directory}: no {path.name} to authenticate the {role} worker")
        public, _ = zmq.auth.load_certificate(str(path))
        return public

    def make_server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def make_client(self, sock: zmq.Socket, server_role: str) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public(server_role)

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """Admit only clients whose public key lies in `allowed/`; the caller stops it on exit."""
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.directory / "allowed"))
        return auth
