"""launch's throwaway TLS material: the private key is its owner's alone."""

import stat

from cloudless_fl.deployment.certs import write_certificates


def test_private_key_is_readable_by_its_owner_only(tmp_path):
    write_certificates(tmp_path)
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "server.key").read_bytes()
    assert {p.name for p in tmp_path.iterdir()} == {"ca.crt", "server.pem", "server.key"}  # the CA key is not kept


def test_a_region_key_pair_is_written_once_private_to_its_owner(tmp_path):
    from cryptography.hazmat.primitives import serialization

    from cloudless_fl.deployment.certs import write_node_key

    private, public = write_node_key(tmp_path, "ap-chengdu")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode loads
    assert key.curve.name == "secp256r1"  # a NIST curve: `flwr supernode register` refuses others
    assert serialization.load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    before = private.read_bytes()
    assert write_node_key(tmp_path, "ap-chengdu") == (private, public) and private.read_bytes() == before  # kept
