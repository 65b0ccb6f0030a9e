//! The request engine without I/O: its flows, sessions, space accounting and garbage, a
//! seeded model of whole runs, and power cuts under the whole stack. One test binary (one
//! module per former file) so the workspace links one binary here instead of six.

#[path = "../engine_common/mod.rs"]
mod engine_common;

mod engine_first_touch;
mod engine_flows;
mod engine_garbage;
mod engine_model;
mod engine_rollback;
mod engine_sessions;
mod engine_space;
mod powercut;
