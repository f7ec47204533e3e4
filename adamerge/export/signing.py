"""Signed exports: an OpenSSF ``model-signing`` signature over every file of an export, ``merge_config.json`` included.

``merge_config.json`` already records the sha256 of every other file, which catches damage; a signature also says
*who* wrote the export, so a recipient can refuse one whose files, or whose manifest itself, were changed on the way
(``adamerge-verify <dir> --key <public.pem>``, or ``adamerge.load_merged(dir, signature="public.pem")``).

Signing settings (``export.sign`` in the run config, ``sign=`` of :func:`adamerge.export.writer.export_merged`):

- ``{key: <EC private key, PEM>}`` (optional ``password``): a key pair you manage; recipients hold the public key;
- ``{certificate: <signing certificate, PEM>, key: <its private key>, chain: [<CA certificates, PEM>]}``: PKI;
  recipients verify against the chain's root.

The signature is ``model.sig`` (a Sigstore bundle) inside the export; it is written before the export is renamed
into place, so an export appears signed or not at all. The library is the optional extra ``signing``
(``pip install 'adamerge[signing]'``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adamerge.errors import ConfigError, ExportError, SignatureError

__all__ = ["SIGNATURE", "check_sign_config", "sign_export", "verify_signature"]

SIGNATURE = "model.sig"
SIGN_KEYS = {"key", "password", "certificate", "chain"}


def _model_signing() -> Any:
    try:
        import model_signing  # noqa: F401  (only to find out whether the extra is installed)
        from model_signing import hashing, signing, verifying
    except ImportError as error:
        raise ConfigError(f"signed exports need the OpenSSF model-signing library, which is not importable ({error}): "
                          "pip install 'adamerge[signing]'") from error
    return hashing, signing, verifying


def _hashing_config() -> Any:
    hashing, _, _ = _model_signing()
    # The signature cannot cover itself; every other file, merge_config.json included, is signed.
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def _existing_file(value: Any, where: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{where}={value!r} is invalid: give the path of a PEM file")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{where}={str(value)!r}: no such file")
    return path


def check_sign_config(sign: Mapping[str, Any] | None, where: str = "export.sign") -> None:
    """Refuse unusable signing settings before anything is written (also called by the run's preflight)."""
    if sign is None:
        return
    if not isinstance(sign, Mapping):
        raise ConfigError(f"{where}={sign!r} is invalid: null, {{key: <private key>}} or "
                          "{certificate: <cert>, key: <private key>, chain: [<CA certs>]}")
    unknown = sorted(set(map(str, sign)) - SIGN_KEYS)
    if unknown:
        raise ConfigError(f"{where} has unknown settings {unknown}; known: {sorted(SIGN_KEYS)}")
    _existing_file(sign.get("key"), f"{where}.key")
    if sign.get("password") is not None and not isinstance(sign.get("password"), str):
        raise ConfigError(f"{where}.password must be a string or null")
    if "certificate" in sign:
        _existing_file(sign.get("certificate"), f"{where}.certificate")
        chain = sign.get("chain") or []
        if isinstance(chain, (str, os.PathLike)) or not isinstance(chain, Sequence):
            raise ConfigError(f"{where}.chain={chain!r} is invalid: a list of PEM certificate paths")
        for index, item in enumerate(chain):
            _existing_file(item, f"{where}.chain[{index}]")
    elif "chain" in sign:
        raise ConfigError(f"{where}.chain is only used with {where}.certificate")
    _model_signing()


def sign_export(directory: str | Path, sign: Mapping[str, Any]) -> Path:
    """Sign every file of ``directory`` into ``directory/model.sig``; returns the signature's path."""
    check_sign_config(sign)
    _, signing, _ = _model_signing()
    directory = Path(directory)
    key = Path(sign["key"]).expanduser()
    config = signing.Config().set_hashing_config(_hashing_config())
    try:
        if "certificate" in sign:
            config = config.use_certificate_signer(
                private_key=key, signing_certificate=Path(sign["certificate"]).expanduser(),
                certificate_chain=[Path(c).expanduser() for c in sign.get("chain") or []])
        else:
            config = config.use_elliptic_key_signer(private_key=key, password=sign.get("password"))
        config.sign(directory, directory / SIGNATURE)
    except (ValueError, TypeError, OSError) as error:  # a key that is not an EC private key, a wrong password
        raise ConfigError(f"export.sign: cannot sign with {key}: {type(error).__name__}: {error}") from error
    return directory / SIGNATURE


# model-signing reports a mismatch as one ValueError holding the repr of a list of lines (quotes escaped where a
# line holds both kinds); the file names are what a user acts on.
_CHANGED = re.compile(r"Hash mismatch for \\*'([^'\\]+)\\*'")
_LISTED = re.compile(r"(Extra|Missing) files (?:found )?in model \\*'[^']*?\\*': ([^\"'\\\]]+)")


def _mismatch_message(directory: Path, text: str) -> str:
    parts = [f"{name} was changed" for name in _CHANGED.findall(text)]
    for kind, names in _LISTED.findall(text):
        verb = "was added" if kind == "Extra" else "is missing"
        parts += [f"{name.strip()} {verb}" for name in names.split(",") if name.strip()]
    what = "; ".join(parts) if parts else text
    return f"{directory} does not match its signature {directory / SIGNATURE}: {what}. Do not use this export"


def verify_signature(directory: str | Path, signature: str | os.PathLike | Mapping[str, Any]) -> None:
    """Check ``directory``'s signature: ``signature`` is the signer's public key (PEM path), or
    ``{key: <public key>}`` / ``{certificate_chain: [<CA certs>]}``, optionally with ``signature: <file>``
    (default ``<directory>/model.sig``). Raises :class:`SignatureError` naming the changed, added or missing files."""
    directory = Path(directory).expanduser()
    settings = dict(signature) if isinstance(signature, Mapping) else {"key": signature}
    unknown = sorted(set(map(str, settings)) - {"key", "certificate_chain", "signature"})
    if unknown or ("key" in settings) == ("certificate_chain" in settings):
        raise ConfigError(f"signature={signature!r} is invalid: a public key path, {{key: <public key>}} or "
                          "{certificate_chain: [<CA certificates>]}")
    _, _, verifying = _model_signing()
    if not directory.is_dir():
        raise ExportError(f"no export at {directory}: not a directory")
    signature_file = Path(settings.get("signature") or directory / SIGNATURE).expanduser()
    if not signature_file.is_file():
        raise SignatureError(f"{directory} is not signed: {signature_file} does not exist")
    config = verifying.Config().set_hashing_config(_hashing_config())
    if "key" in settings:
        config = config.use_elliptic_key_verifier(public_key=_existing_file(settings["key"], "signature key"))
    else:
        chain = [_existing_file(c, "signature certificate_chain") for c in settings["certificate_chain"]]
        config = config.use_certificate_verifier(certificate_chain=chain)
    try:
        config.verify(directory, signature_file)
    except ValueError as error:
        if "Signature mismatch" in str(error):
            raise SignatureError(_mismatch_message(directory, str(error))) from error
        raise SignatureError(f"{signature_file} is not a valid signature of {directory} by the given key or "
                             f"certificates: {type(error).__name__}: {error}") from error
    except Exception as error:  # a forged or unparsable bundle: cryptography, json and sigstore raise their own
        raise SignatureError(f"{signature_file} is not a valid signature of {directory} by the given key or "
                             f"certificates: {type(error).__name__}: {error}") from error
