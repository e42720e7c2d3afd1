"""TLS contexts for both sides of the SMTP proxy.

The proxy never strips STARTTLS: towards the client it offers TLS with the configured
certificate, or with a self-signed one generated at first start (as Postfix and Exim
installations commonly ship), and towards the server it uses STARTTLS whenever offered.
Server certificates are not verified: on port 25 that is the norm (RFC 7435 opportunistic
security), and a failed verification would only push the mail into plain text.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

from proxies import logs


class TlsSetupError(Exception):
    pass


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A certificate and key in `directory`, created with openssl the first time."""
    cert, key = directory / "smtpd-cert.pem", directory / "smtpd-key.pem"
    if cert.exists() and key.exists():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
             "-subj", f"/CN={hostname}", "-addext", f"subjectAltName=DNS:{hostname}",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )
    except FileNotFoundError:
        raise TlsSetupError("openssl is needed to generate a certificate (apt install openssl), "
                            "or set smtp.tls_cert and smtp.tls_key") from None
    except subprocess.CalledProcessError as exc:
        raise TlsSetupError(f"openssl failed: {exc.stderr.decode(errors='replace')}") from None
    key.chmod(0o600)
    logs.event("tls_certificate_generated", cert=str(cert), hostname=hostname)
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load certificate {cert} / key {key}: {exc}") from None
    return context


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
