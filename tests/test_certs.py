"""launch's throwaway TLS material: the private key is its owner's alone."""

import stat

from cloudless_fl.deployment.certs import write_certificates


def test_private_key_is_readable_by_its_owner_only(tmp_path):
    write_certificates(tmp_path)
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "server.key").read_bytes()
    assert {p.name for p in tmp_path.iterdir()} == {"ca.crt", "server.pem", "server.key"}  # the CA key is not kept
