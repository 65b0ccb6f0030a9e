//! Test harness: an N-node corosync cluster in network namespaces.
