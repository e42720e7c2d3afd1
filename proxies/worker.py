"""`python -m proxies.worker`: one SMTP acceptor worker, started and supervised by the master
(`mailgate run` with smtp.workers > 1; see proxies.run and proxies.process)."""

from __future__ import annotations

import sys

from proxies.run import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
