"""Messages for the content-filter tests, built with the stdlib and sent as CRLF bytes."""

from __future__ import annotations

import email.policy
import io
import zipfile
from email.message import EmailMessage

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def plain(subject: str = "Hello", body: str = "Just a note.\r\n",
          sender: str = "alice@sender.example", to: str = "bob@example.com") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
            f"Message-ID: <{abs(hash(subject + body))}@sender.example>\r\n\r\n{body}"
            ).encode()


def with_attachments(*attachments: tuple[str, bytes, str], subject: str = "Files") -> bytes:
    """`attachments`: (filename, data, MIME type)."""
    message = EmailMessage()
    message["From"] = "alice@sender.example"
    message["To"] = "bob@example.com"
    message["Subject"] = subject
    message["Date"] = "Mon, 01 Jan 2024 00:00:00 +0000"
    message["Message-ID"] = f"<{abs(hash(attachments))}@sender.example>"
    message.set_content("See attached.\n")
    for name, data, mime in attachments:
        major, minor = mime.split("/")
        message.add_attachment(data, maintype=major, subtype=minor, filename=name)
    return message.as_bytes(policy=email.policy.SMTP)


def zipped(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()
