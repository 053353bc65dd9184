"""pagepipe keygen: a ZeroMQ certificate pair the stages accept, the secret one private, never overwritten."""
from __future__ import annotations

import stat

import zmq.auth

from pipeline.cli import main
from stages.common.security import link_security


def test_keygen_writes_a_certificate_pair_the_stages_accept(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "keys"), "--name", "backup"]) == 0
    public, secret = tmp_path / "keys" / "backup.key", tmp_path / "keys" / "backup.key_secret"
    assert f"secret key: {secret}" in capsys.readouterr().out
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    public_key, secret_key = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (public_key, None) and len(secret_key) == 40
    security = link_security("zmq-src", "tcp://127.0.0.1:5555", True, secret_key=str(secret),
                             authorized_keys=str(tmp_path / "keys"))
    assert security.curve and security.public == public_key and public_key in security.allowed


def test_keygen_never_overwrites_a_key(tmp_path, capsys):
    assert main(["keygen", str(tmp_path)]) == 0
    before = (tmp_path / "pagepipe.key_secret").read_bytes()
    assert main(["keygen", str(tmp_path)]) == 2
    assert "pagepipe.key exists" in capsys.readouterr().err
    assert (tmp_path / "pagepipe.key_secret").read_bytes() == before
