"""The image tier: boots images/build/mailgate.raw under qemu and sends mail across it.

It needs a built image, root, qemu and minutes of emulated boot, so only `make image-test`
runs it (it sets MAILGATE_IMAGE_TEST=1 after building the image); `make test` leaves it out,
rather than skipping it (a skip would fail a CI run).
"""

from __future__ import annotations

import os

if os.environ.get("MAILGATE_IMAGE_TEST") != "1":
    collect_ignore_glob = ["test_*.py"]
