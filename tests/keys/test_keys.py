"""OpenSSH ed25519 keys: generation, loading, fingerprints, trusted-keys files."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest

from overlay.errors import KeyProblem
from overlay.keys import (
    TrustedKeys,
    generate_signing_key,
    load_signing_key,
    load_trusted_keys,
    parse_public_key_line,
)

needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                      reason="ssh-keygen is not installed on this machine")


def test_generated_key_is_private_0600_with_pub_line(tmp_path):
    key = generate_signing_key(tmp_path / "deploy", comment="me@laptop")
    assert stat.S_IMODE((tmp_path / "deploy").stat().st_mode) == 0o600
    line = (tmp_path / "deploy.pub").read_text().strip()
    assert line.startswith("ssh-ed25519 AAAA") and line.endswith("me@laptop")
    assert parse_public_key_line(line).key_id == key.key_id
    assert load_signing_key(tmp_path / "deploy").key_id == key.key_id


def test_generate_refuses_to_overwrite(tmp_path):
    generate_signing_key(tmp_path / "deploy")
    with pytest.raises(KeyProblem, match="already exists"):
        generate_signing_key(tmp_path / "deploy")


@pytest.mark.slow
@needs_ssh_keygen
def test_key_id_matches_ssh_keygen_fingerprint(tmp_path):
    key = generate_signing_key(tmp_path / "deploy", comment="c")
    out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "deploy.pub")], capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[1] == key.key_id


@pytest.mark.slow
@needs_ssh_keygen
def test_ssh_keygen_key_signs_and_passphrase_is_honoured(tmp_path, monkeypatch):
    plain, locked = tmp_path / "id_ed25519", tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(plain)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "hunter2", "-f", str(locked)], check=True)
    key = load_signing_key(plain)
    assert key.public.verify(key.sign(b"m"), b"m")
    monkeypatch.setenv("HABANERO_KEY_PASSPHRASE", "hunter2")
    assert load_signing_key(locked).key_id.startswith("SHA256:")
    monkeypatch.setenv("HABANERO_KEY_PASSPHRASE", "wrong")
    with pytest.raises(KeyProblem) as info:
        load_signing_key(locked)
    assert info.value.code == "wrong_passphrase"
    monkeypatch.delenv("HABANERO_KEY_PASSPHRASE")
    with pytest.raises(KeyProblem) as info:
        load_signing_key(locked)
    assert info.value.code == "wrong_passphrase" and "HABANERO_KEY_PASSPHRASE" in info.value.message


@pytest.mark.slow
@needs_ssh_keygen
def test_rsa_key_is_refused_with_a_clear_message(tmp_path):
    rsa = tmp_path / "id_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True)
    with pytest.raises(KeyProblem, match="only ed25519 keys are supported"):
        load_signing_key(rsa)
    with pytest.raises(KeyProblem, match="only ed25519 keys are"):
        parse_public_key_line((tmp_path / "id_rsa.pub").read_text())


def test_missing_key_file_says_how_to_make_one(tmp_path):
    with pytest.raises(KeyProblem, match="habanero-pack keygen"):
        load_signing_key(tmp_path / "nope")


def test_trusted_keys_file_allows_comments_and_blank_lines(tmp_path):
    a = generate_signing_key(tmp_path / "a", comment="alice")
    b = generate_signing_key(tmp_path / "b", comment="bob")
    path = tmp_path / "trusted"
    path.write_text(f"# team\n\n{a.public.line()}\n   \n{b.public.line()}\n")
    keys = load_trusted_keys(path)
    assert len(keys) == 2 and a.key_id in keys and b.key_id in keys
    assert keys.get(a.key_id).comment == "alice"


def test_malformed_trusted_key_line_names_its_line_number(tmp_path):
    a = generate_signing_key(tmp_path / "a")
    path = tmp_path / "trusted"
    path.write_text(f"{a.public.line()}\n# ok\nssh-ed25519 not-base64!!\n")
    with pytest.raises(KeyProblem, match="line 3"):
        load_trusted_keys(path)


def test_trusted_keys_accept_a_list_of_lines(tmp_path):
    a = generate_signing_key(tmp_path / "a")
    assert isinstance(load_trusted_keys([a.public.line()]), TrustedKeys)
    assert a.key_id in load_trusted_keys(a.public.line())


def test_missing_trusted_keys_file_is_a_clear_error(tmp_path):
    with pytest.raises(KeyProblem, match="does not exist"):
        load_trusted_keys(tmp_path / "absent")


def test_hand_read_openssh_formats_agree_with_cryptography(tmp_path):
    # keys.py reads unencrypted OpenSSH keys itself (start-up time); cryptography is the reference.
    from cryptography.hazmat.primitives import serialization

    key = generate_signing_key(tmp_path / "k", comment="c")
    reference = serialization.load_ssh_private_key((tmp_path / "k").read_bytes(), password=None)
    assert reference.private_bytes_raw() == load_signing_key(tmp_path / "k").private.private_bytes_raw()
    expected = reference.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH).decode()
    assert key.public.line() == f"{expected} c"


def test_public_key_line_with_trailing_garbage_in_the_blob_is_refused(tmp_path):
    import base64

    line = generate_signing_key(tmp_path / "k").public.line()
    kind, blob = line.split()[:2]
    padded = base64.b64encode(base64.b64decode(blob) + b"\0\0\0\0").decode()
    with pytest.raises(KeyProblem, match="not a valid ed25519 public key"):
        parse_public_key_line(f"{kind} {padded}")
