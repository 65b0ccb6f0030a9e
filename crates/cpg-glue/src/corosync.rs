//! Real corosync: CPG, quorum, cmap, cfg.
