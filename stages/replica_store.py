"""The documented home of ``load_replica`` and friends; the storage engine lives in
``stages.common.replica_store``, resuming in ``stages.trackers.resume``."""
from stages.common.replica_store import (  # noqa: F401  (re-exported names)
    ReplicaStore, VerifyReport, load_arrays, load_replica, read_manifest, verify_replica)
from stages.trackers.resume import resume_from_replica  # noqa: F401
