"""Fixtures every test folder can use."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from stages.common.security import write_keypair


@dataclass(frozen=True)
class CurveKeys:
    """Key pairs for a CURVE link: a server (the end that binds), its allowed client, a stranger."""

    server_secret: str
    server_public: str
    client_secret: str
    client_public: str
    allowed: str            # directory holding the client's public key: the server's allow-list
    stranger_secret: str
    stranger_public: str

    def server(self, **extra) -> dict:
        """Properties of the binding end."""
        return {"secret_key": self.server_secret, "authorized_keys": self.allowed, **extra}

    def client(self, **extra) -> dict:
        """Properties of the connecting end."""
        return {"secret_key": self.client_secret, "server_key": self.server_public, **extra}


def make_curve_keys(directory: Path) -> CurveKeys:
    server_public, server_secret = write_keypair(directory / "server", "server")
    client_public, client_secret = write_keypair(directory / "client", "client")
    stranger_public, stranger_secret = write_keypair(directory / "stranger", "stranger")
    allowed = directory / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes(Path(client_public).read_bytes())
    return CurveKeys(str(server_secret), str(server_public), str(client_secret), str(client_public), str(allowed),
                     str(stranger_secret), str(stranger_public))


@pytest.fixture
def curve_keys(tmp_path) -> CurveKeys:
    return make_curve_keys(tmp_path / "keys")
