//! In-memory cluster with virtual-synchrony semantics, for deterministic tests.
