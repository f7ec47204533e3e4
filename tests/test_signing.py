"""Signed exports (adamerge.export.signing): a recipient refuses an export whose files or merge_config.json changed."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

pytest.importorskip("model_signing", reason="the optional extra 'signing' (model-signing) is not installed")

from cryptography import x509  # noqa: E402  (after the skip: model-signing brings cryptography)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from adamerge import load_backbone, load_merged  # noqa: E402
from adamerge.errors import ConfigError, SignatureError  # noqa: E402
from adamerge.export.writer import MERGE_CONFIG, WEIGHTS, export_merged  # noqa: E402
from adamerge.cli.verify import main as verify_main  # noqa: E402
from adamerge.export.signing import SIGNATURE  # noqa: E402
from tests.helpers import TinyConvNet, make_heads  # noqa: E402

ARCH = {"_target_": "tests.helpers.TinyConvNet", "features": 5}
TRUST = ["tests.helpers.TinyConvNet"]


def _pem_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _pem_public(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.fixture
def keys(tmp_path):
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    return {"private": _pem_key(key, tmp_path / "signer.pem"), "public": _pem_public(key, tmp_path / "signer.pub"),
            "other_public": _pem_public(other, tmp_path / "other.pub")}


def _export(directory: Path, sign: dict | None) -> Path:
    return export_merged(TinyConvNet(5).eval(), directory, merge_config={"method": "ties"}, architecture=ARCH,
                         heads=make_heads(["a", "b"], features=5, classes=3), model_card=False, sign=sign)


@pytest.fixture
def signed(tmp_path, keys):
    return _export(tmp_path / "merged", {"key": str(keys["private"])})


def _forge_hashes(directory: Path) -> None:
    """What someone who changed a file does next: record its new sha256, so only the signature can tell."""
    import hashlib

    config = json.loads((directory / MERGE_CONFIG).read_text())
    for name in config["files"]:
        config["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    for task, record in config["heads"].items():
        record["sha256"] = config["files"][record["file"]]
    (directory / MERGE_CONFIG).write_text(json.dumps(config))


def test_signed_export_verifies_and_loads(signed, keys, capsys):
    assert (signed / SIGNATURE).is_file()
    assert SIGNATURE not in json.loads((signed / MERGE_CONFIG).read_text())["files"]
    model = load_merged(signed, trust=TRUST, signature=str(keys["public"]))
    assert set(model.heads) == {"a", "b"}
    load_backbone(signed, trust=TRUST, signature={"key": keys["public"]})
    assert verify_main([str(signed), "--key", str(keys["public"])]) == 0
    assert "verified" in capsys.readouterr().out


def _change_weights(d: Path) -> None:
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (d / WEIGHTS).write_bytes(bytes(data))
    _forge_hashes(d)


def _change_config(d: Path) -> None:
    config = json.loads((d / MERGE_CONFIG).read_text())
    config["method"] = "task_arithmetic"
    (d / MERGE_CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("damage, names", [
    (_change_weights, [f"{WEIGHTS} was changed", f"{MERGE_CONFIG} was changed"]),
    (_change_config, [f"{MERGE_CONFIG} was changed"]),
    (lambda d: (d / "heads" / "b.safetensors").unlink(), ["heads/b.safetensors is missing"]),
    (lambda d: (d / "notes.txt").write_text("added later"), ["notes.txt was added"]),
], ids=["weights-and-manifest", "manifest-only", "file-removed", "file-added"])
def test_a_changed_export_is_refused_naming_the_file(signed, keys, capsys, damage, names):
    damage(signed)
    with pytest.raises(SignatureError) as info:
        load_merged(signed, trust=TRUST, signature=keys["public"])
    for name in names:
        assert name in str(info.value)
    assert verify_main([str(signed), "--key", str(keys["public"])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("adamerge-verify: error: SignatureError: ") and all(name in err for name in names)


def test_another_key_or_no_signature_is_refused(signed, keys, tmp_path):
    with pytest.raises(SignatureError, match="not a valid signature"):
        load_merged(signed, trust=TRUST, signature=keys["other_public"])
    unsigned = _export(tmp_path / "unsigned", None)
    with pytest.raises(SignatureError, match=rf"is not signed: .*{SIGNATURE} does not exist"):
        load_backbone(unsigned, trust=TRUST, signature=keys["public"])
    (signed / SIGNATURE).write_text("{}")
    with pytest.raises(SignatureError, match=f"{SIGNATURE} is not a valid signature"):
        load_backbone(signed, trust=TRUST, signature=keys["public"])


def test_bad_signing_settings_fail_before_writing(tmp_path, keys):
    for sign, named in [({"key": str(tmp_path / "absent.pem")}, "sign.key"), ({"kee": "x"}, "kee"),
                        ({"key": str(keys["public"])}, "cannot sign with"),
                        ({"key": str(keys["private"]), "chain": [str(keys["public"])]}, "sign.chain")]:
        with pytest.raises(ConfigError, match=named):
            _export(tmp_path / "out", sign)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "a staging directory was left"


def _certificate(subject: str, key, issuer_name: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False), critical=True))
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def test_certificate_signed_export_verifies_against_its_chain(tmp_path):
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test CA", ca_key, "test CA", ca_key, ca=True)
    leaf = _certificate("signer", leaf_key, "test CA", ca_key, ca=False)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    sign = {"certificate": str(tmp_path / "leaf.pem"), "key": str(_pem_key(leaf_key, tmp_path / "leaf.key")),
            "chain": [str(tmp_path / "ca.pem")]}
    out = _export(tmp_path / "merged", sign)
    load_backbone(out, trust=TRUST, signature={"certificate_chain": [tmp_path / "ca.pem"]})
    assert verify_main([str(out), "--certificate-chain", str(tmp_path / "ca.pem")]) == 0
    _change_config(out)
    with pytest.raises(SignatureError, match=f"{MERGE_CONFIG} was changed"):
        load_backbone(out, trust=TRUST, signature={"certificate_chain": [tmp_path / "ca.pem"]})


def test_a_run_signs_its_export_and_the_verify_command_checks_it(zoo, tmp_path, keys, capsys):
    """End to end: `adamerge ... export.sign.key=<pem>` writes a signed export that adamerge-verify accepts with the
    signer's public key and refuses with another's, naming what failed."""
    from tests.test_cli import adamerge

    run_dir = tmp_path / "run"
    adamerge(run_dir, zoo, "method=ties", "export.static=true", "logger=none", f"+export.sign.key={keys['private']}")
    export = run_dir / "merged_model"
    assert (export / SIGNATURE).is_file() and (export / MERGE_CONFIG).is_file()
    assert verify_main([str(export), "--key", str(keys["public"])]) == 0
    assert verify_main([str(export), "--key", str(keys["other_public"])]) != 0
    load_merged(export, signature=str(keys["public"]))
    with pytest.raises(SignatureError):
        load_merged(export, signature=str(keys["other_public"]))
