//! csnap agent: membership, server choice, failover, merge handling.
