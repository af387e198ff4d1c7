"""Settings for the whole test suite.

The gRPC server starts with every app (its lifespan) on port 8001 by default, with SO_REUSEPORT; in-process
apps and server processes of parallel test runs would all share that port. So tests run with gRPC off
(``CONVSERVE_GRPC_PORT=0``, inherited by the server processes they start) and the gRPC tests give their
servers a free port of their own.
"""

import os
import tempfile

os.environ["CONVSERVE_GRPC_PORT"] = "0"
# The state store's default file (data/ under the working directory) is the user's, not the suite's: in-process
# apps share one file of this run's own; each server process gets one of its own (tests/support/server.py).
STATE_DIR = tempfile.mkdtemp(prefix="convserve-state-")
os.environ.setdefault("CONVSERVE_STATE_URL", f"sqlite:///{STATE_DIR}/in-process.sqlite")
