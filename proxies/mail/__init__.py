"""What SMTP and POP3 share about a mail message, written once.

- `headers`: the header section of a message as bytes, field by field.
- `tagging`: our own header fields added, forged copies of them removed, the Subject prefixed.
- `actions`: the scan verdict -> action table.
- `limits`: connections counted per client address and in total.
- `durable`: a file written so that it survives a crash (file and directory fsync).

Nothing here does I/O on a socket or knows which protocol carried the message; the SMTP filter
(`proxies.scan.filter`), the POP3 proxy (`proxies.pop3`), the quarantine and the queue use
these parts, so where the two protocols used to disagree they now cannot.
"""
