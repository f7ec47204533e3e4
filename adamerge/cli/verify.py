"""The ``adamerge-verify`` command: check a signed export's signature, then every file's recorded sha256."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from adamerge.errors import AdamergeError, report_cli_error
from adamerge.export.loading import verify_export
from adamerge.export.signing import SIGNATURE, verify_signature


def main(argv: Sequence[str] | None = None) -> int:
    """``adamerge-verify <export> --key <public.pem>``: the signature, then every file's recorded sha256."""
    parser = argparse.ArgumentParser(prog="adamerge-verify", description="Check a signed adamerge export.")
    parser.add_argument("export", help="the export directory (merged_model/)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", help="the signer's public key (PEM)")
    who.add_argument("--certificate-chain", nargs="+", help="CA certificates (PEM) the signing certificate chains to")
    parser.add_argument("--signature", help=f"the signature file (default: <export>/{SIGNATURE})")
    args = parser.parse_args(argv)
    settings: dict[str, Any] = {"key": args.key} if args.key else {"certificate_chain": args.certificate_chain}
    if args.signature:
        settings["signature"] = args.signature
    try:
        verify_signature(args.export, settings)
        verify_export(args.export)
    except AdamergeError as error:
        return report_cli_error("adamerge-verify", f"{type(error).__name__}: {error}", 1)
    print(f"adamerge-verify: {args.export}: signature and every file's sha256 verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
