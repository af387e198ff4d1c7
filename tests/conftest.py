"""Settings for the whole test suite.

The gRPC server starts with every app (its lifespan) on port 8001 by default, with SO_REUSEPORT; in-process
apps and server processes of parallel test runs would all share that port. So tests run with gRPC off
(``CONVSERVE_GRPC_PORT=0``, inherited by the server processes they start) and the gRPC tests give their
servers a free port of their own.
"""

import os

os.environ["CONVSERVE_GRPC_PORT"] = "0"
