//! The store on its own: its operations against a reference model, crashes and damage,
//! diffs, progress, scale, space and usage, and the commit-batching benchmark (ignored). One
//! test binary (one module per former file) so the workspace links one binary here instead of
//! twelve.

#[path = "../engine_common/mod.rs"]
mod engine_common;
#[path = "../store_support/mod.rs"]
mod store_support;

mod store_basic;
mod store_bench;
mod store_crash;
mod store_damage;
mod store_diff;
mod store_differential;
mod store_model;
mod store_progress;
mod store_scale;
mod store_space;
mod store_tool;
mod store_usage;
