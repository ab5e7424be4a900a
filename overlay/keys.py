"""Ed25519 keys in the formats users already know from OpenSSH.

A signing key is an OpenSSH private key (``ssh-keygen -t ed25519`` or ``habanero-pack keygen``); a
public key is one ``ssh-ed25519 AAAA… comment`` line; a key id is the ``SHA256:…`` fingerprint
exactly as ``ssh-keygen -lf`` prints it, so a user can match an error message against their keys by
eye. The trusted-keys file is ``authorized_keys``-style. Trust is configured in the app process only:
nothing here is reachable over HTTP.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from overlay.errors import KeyProblem

# The app side only checks signatures (``overlay.ed25519``), and loads no ``cryptography`` for it:
# a public key is its 32 raw bytes. Private keys (the developer's side) are ``cryptography``'s,
# imported when one is loaded or made; its serialization module costs tens of milliseconds to
# import, on every habanero-pack run: the OpenSSH wire formats of ed25519 keys are simple enough to
# read and write here, and it is imported only for what it alone can do (encrypted private keys,
# writing a new key).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "PublicKey",
    "SigningKey",
    "TrustedKeys",
    "generate_signing_key",
    "load_signing_key",
    "load_trusted_keys",
    "parse_public_key_line",
]

_SSH_ED25519 = "ssh-ed25519"


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key (its 32 raw bytes) and its OpenSSH fingerprint."""

    raw: bytes
    key_id: str
    comment: str = ""

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is this key's signature of ``message``."""
        from overlay import ed25519  # ctypes: loaded where signatures are checked, not by the packer

        return ed25519.verify(self.raw, signature, message)

    def line(self) -> str:
        """The ``ssh-ed25519 AAAA… comment`` line for a trusted-keys file."""
        blob = base64.b64encode(_public_blob(self.raw)).decode("ascii")
        return f"{_SSH_ED25519} {blob} {self.comment}".rstrip()


@dataclass(frozen=True)
class SigningKey:
    """A private key that can sign bundles and control requests."""

    private: Ed25519PrivateKey
    public: PublicKey
    path: str | None = None

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _public_blob(raw: bytes) -> bytes:
    """The SSH wire form of an ed25519 public key: string "ssh-ed25519", string key."""
    return _ssh_string(_SSH_ED25519.encode()) + _ssh_string(raw)


def fingerprint(raw: bytes) -> str:
    """``SHA256:<base64 of the wire blob, unpadded>``, as ``ssh-keygen -lf`` prints it."""
    digest = base64.b64encode(hashlib.sha256(_public_blob(raw)).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


class _Reader:
    """Reads SSH wire strings and integers; raises ValueError when the data runs out."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated key data")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self) -> bytes:
        return self.take(self.uint32())


def _parse_public_blob(blob: bytes) -> bytes:
    reader = _Reader(blob)
    if reader.string() != _SSH_ED25519.encode():
        raise ValueError("not an ssh-ed25519 key")
    raw = reader.string()
    if len(raw) != 32 or reader.pos != len(blob):
        raise ValueError("an ed25519 public key is 32 bytes")
    return raw


def _plain_openssh_ed25519(pem: bytes) -> Ed25519PrivateKey | None:
    """An unencrypted OpenSSH ed25519 private key, or None for anything else (left to cryptography)."""
    try:
        body = b"".join(line.strip() for line in pem.strip().splitlines()[1:-1])
        reader = _Reader(base64.b64decode(body, validate=True))
        if reader.take(15) != b"openssh-key-v1\x00":
            return None
        if reader.string() != b"none" or reader.string() != b"none":
            return None  # encrypted: cryptography (and bcrypt) handle it
        reader.string()  # kdf options
        if reader.uint32() != 1:
            return None
        public = reader.string()
        secret = _Reader(reader.string())
        if secret.uint32() != secret.uint32():
            return None
        if secret.string() != _SSH_ED25519.encode():
            return None
        pub, priv = secret.string(), secret.string()
        if len(pub) != 32 or len(priv) != 64 or priv[32:] != pub or public != _ssh_string(
                _SSH_ED25519.encode()) + _ssh_string(pub):
            return None
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(priv[:32])
    except (ValueError, binascii.Error, struct.error):
        return None


def _public_key(raw: bytes, comment: str = "") -> PublicKey:
    return PublicKey(raw=raw, key_id=fingerprint(raw), comment=comment)


def _raw_public(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def parse_public_key_line(line: str, *, where: str = "public key") -> PublicKey:
    """Parse one ``ssh-ed25519 AAAA… [comment]`` line; refuse anything else with a reason."""
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise KeyProblem(
            f"{where}: expected 'ssh-ed25519 AAAA… comment', got {line.strip()[:60]!r}",
            code="bad_trusted_keys",
        )
    kind, b64 = parts[0], parts[1]
    comment = parts[2] if len(parts) > 2 else ""
    if kind != _SSH_ED25519:
        raise KeyProblem(
            f"{where}: key type {kind!r} is not supported; only ed25519 keys are "
            "(make one with `habanero-pack keygen` or `ssh-keygen -t ed25519`)",
            code="unsupported_key",
        )
    try:
        key = _parse_public_blob(base64.b64decode(b64, validate=True))
    except (ValueError, binascii.Error, UnicodeEncodeError) as exc:
        raise KeyProblem(f"{where}: the key data is not a valid ed25519 public key ({exc})",
                         code="bad_trusted_keys") from None
    return _public_key(key, comment)


class TrustedKeys:
    """The set of public keys whose signatures this process accepts, looked up by key id."""

    def __init__(self, keys: Iterable[PublicKey], *, source: str = "trusted keys") -> None:
        self._by_id: dict[str, PublicKey] = {}
        for key in keys:
            self._by_id.setdefault(key.key_id, key)
        self.source = source

    @classmethod
    def from_lines(cls, lines: Iterable[str], *, source: str = "trusted keys") -> TrustedKeys:
        """Parse ``authorized_keys``-style lines: one key per line, ``#`` comments, blanks allowed."""
        keys = []
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keys.append(parse_public_key_line(line, where=f"{source}, line {number}"))
        return cls(keys, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TrustedKeys:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeyProblem(
                f"trusted keys file {path} does not exist; create it with one 'ssh-ed25519 AAAA…' "
                "line per key allowed to deploy (the .pub file `habanero-pack keygen` wrote)",
                code="bad_trusted_keys",
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyProblem(f"cannot read trusted keys file {path}: {exc}", code="bad_trusted_keys") from None
        return cls.from_lines(text.splitlines(), source=str(path))

    def get(self, key_id: str) -> PublicKey | None:
        return self._by_id.get(key_id)

    def __iter__(self) -> Iterator[PublicKey]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._by_id

    def __repr__(self) -> str:
        return f"TrustedKeys({list(self._by_id)!r}, source={self.source!r})"


def load_trusted_keys(source: TrustedKeys | str | os.PathLike[str] | Iterable[str]) -> TrustedKeys:
    """Accept a ``TrustedKeys``, a path to a trusted-keys file, or an iterable of key lines."""
    if isinstance(source, TrustedKeys):
        return source
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.lstrip().startswith(_SSH_ED25519 + " "):
            return TrustedKeys.from_lines(text.splitlines(), source="trusted keys argument")
        return TrustedKeys.from_file(text)
    return TrustedKeys.from_lines(list(source), source="trusted keys argument")


def load_signing_key(path: str | os.PathLike[str], passphrase: str | bytes | None = None) -> SigningKey:
    """Load an OpenSSH Ed25519 private key, asking for a passphrase when one is needed.

    The passphrase comes from the argument, then ``HABANERO_KEY_PASSPHRASE``, then a prompt when
    stdin is a terminal.
    """
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyProblem(
            f"signing key {path} does not exist; create one with `habanero-pack keygen --out {path}`",
            code="bad_key",
        ) from None
    except OSError as exc:
        raise KeyProblem(f"cannot read signing key {path}: {exc}", code="bad_key") from None
    if passphrase is None:
        passphrase = os.environ.get("HABANERO_KEY_PASSPHRASE")
    private = _load_private(data, path, passphrase)
    return SigningKey(private=private, public=_public_key(_raw_public(private), _comment_of(path)), path=str(path))


def _comment_of(path: Path) -> str:
    pub = path.with_name(path.name + ".pub")
    try:
        parts = pub.read_text(encoding="utf-8").split(None, 2)
    except (OSError, UnicodeDecodeError):
        return ""
    return parts[2].strip() if len(parts) > 2 else ""


def _load_private(data: bytes, path: Path, passphrase: str | bytes | None) -> Ed25519PrivateKey:
    if b"BEGIN OPENSSH PRIVATE KEY" not in data:
        raise KeyProblem(
            f"{path} is not an OpenSSH private key; only ed25519 keys in OpenSSH format are supported "
            "(`ssh-keygen -t ed25519` or `habanero-pack keygen`)",
            code="unsupported_key",
        )
    plain = _plain_openssh_ed25519(data)
    if plain is not None:
        return plain  # a passphrase given for a key without one is harmless: the key is usable
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    password = passphrase.encode() if isinstance(passphrase, str) else passphrase
    try:
        key = serialization.load_ssh_private_key(data, password=password)
    except TypeError:
        if password is None and sys.stdin is not None and sys.stdin.isatty():
            import getpass

            return _load_private(data, path, getpass.getpass(f"Passphrase for {path}: "))
        if password is None:
            raise KeyProblem(
                f"signing key {path} is protected by a passphrase; set HABANERO_KEY_PASSPHRASE "
                "or run from a terminal to be asked for it",
                code="wrong_passphrase",
            ) from None
        raise KeyProblem(f"signing key {path} is not protected by a passphrase; unset "
                         "HABANERO_KEY_PASSPHRASE", code="wrong_passphrase") from None
    except UnsupportedAlgorithm as exc:
        if "bcrypt" in str(exc):
            raise KeyProblem(
                f"signing key {path} is passphrase-protected, which needs the optional 'bcrypt' "
                "package: pip install 'habanero[passphrase]'",
                code="missing_dependency",
            ) from None
        raise KeyProblem(f"{path}: unsupported key ({exc}); only ed25519 keys are supported",
                         code="unsupported_key") from None
    except ValueError as exc:
        if password is not None:
            raise KeyProblem(f"wrong passphrase for signing key {path} (or the key file is corrupt)",
                             code="wrong_passphrase") from None
        raise KeyProblem(f"{path} is not a valid OpenSSH private key ({exc})", code="bad_key") from None
    if not isinstance(key, Ed25519PrivateKey):
        kind = type(key).__name__.replace("PrivateKey", "").lstrip("_").upper() or "this"
        raise KeyProblem(
            f"{path} is an {kind} key; only ed25519 keys are supported "
            "(make one with `habanero-pack keygen` or `ssh-keygen -t ed25519`)",
            code="unsupported_key",
        )
    return key


def generate_signing_key(path: str | os.PathLike[str], *, comment: str = "", overwrite: bool = False) -> SigningKey:
    """Write a new Ed25519 pair: ``path`` (OpenSSH private key, mode 0600) and ``path.pub``."""
    path = Path(path).expanduser()
    pub_path = path.with_name(path.name + ".pub")
    if not overwrite and (path.exists() or pub_path.exists()):
        raise KeyProblem(f"{path} already exists; choose another --out or remove it first", code="bad_key")
    path.parent.mkdir(parents=True, exist_ok=True)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(path, 0o600)
    public = _public_key(_raw_public(private), comment)
    pub_path.write_text(public.line() + "\n", encoding="utf-8")
    return SigningKey(private=private, public=public, path=str(path))
