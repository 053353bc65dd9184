"""The documented home of ``load_replica`` and friends; the storage engine lives in
``stages.common.replica_store``."""
from stages.common.replica_store import (  # noqa: F401  (re-exported names)
    ReplicaStore, VerifyReport, load_replica, read_manifest, verify_replica)
