//! A minimal `extern "C"` binding for libcpg (corosync 3.x): just what
//! [`CorosyncGroup`](super::CorosyncGroup) needs.
//!
//! Why not rust-corosync's `cpg` module (which we do use for quorum, cmap and cfg):
//!
//! * its `cpg::initialize` always passes model flags 0, so it cannot ask for
//!   `CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF`. Without that flag a fresh member gets no totem
//!   confchg until the next membership change, and the totem confchg is the event that marks
//!   "membership is stable, act now" for the layers above;
//! * its callbacks are plain `fn` pointers looked up in a process-global registry keyed by
//!   handle; here each handle carries a context pointer to its own event sink instead, so
//!   there is no global state and no lock shared between unrelated groups.
//!
//! Layouts follow `/usr/include/corosync/cpg.h` and `corotypes.h` (C enums are `int`-sized;
//! handles are `uint64_t`). Only the V1 model is bound.

// The items mirror cpg.h's under its names (prefix dropped); cpg.h documents them.
#![allow(missing_docs)]
#![allow(non_camel_case_types)]

use std::os::raw::{c_char, c_int, c_uint, c_void};

/// `cpg_handle_t`.
pub type cpg_handle_t = u64;
/// `cs_error_t` (a C enum; `CS_OK` is 1). Converted with `rust_corosync::CsError::try_from`.
pub type cs_error_t = c_uint;

pub const CS_OK: cs_error_t = 1;
pub const CS_ERR_TRY_AGAIN: cs_error_t = 6;
pub const CS_ERR_BAD_HANDLE: cs_error_t = 9;

/// `cs_dispatch_flags_t::CS_DISPATCH_ONE_NONBLOCKING`: process one pending callback if
/// there is one; `CS_ERR_TRY_AGAIN` when there is none. Never blocks.
pub const CS_DISPATCH_ONE_NONBLOCKING: c_uint = 4;

/// `cpg_guarantee_t::CPG_TYPE_AGREED` (the only ordering corosync implements; FIFO is the
/// same, SAFE is not implemented).
pub const CPG_TYPE_AGREED: c_uint = 2;

/// `cpg_flow_control_state_t::CPG_FLOW_CONTROL_ENABLED`.
pub const CPG_FLOW_CONTROL_ENABLED: c_uint = 1;

/// `cpg_model_t::CPG_MODEL_V1`.
pub const CPG_MODEL_V1: c_uint = 1;
/// Deliver the current totem membership right after join (see the module comment).
pub const CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF: c_uint = 0x01;

/// `CPG_MAX_NAME_LENGTH`.
pub const CPG_MAX_NAME_LENGTH: usize = 128;

/// `cpg_reason_t` values.
pub const CPG_REASON_JOIN: u32 = 1;
pub const CPG_REASON_LEAVE: u32 = 2;
pub const CPG_REASON_NODEDOWN: u32 = 3;
pub const CPG_REASON_NODEUP: u32 = 4;
pub const CPG_REASON_PROCDOWN: u32 = 5;

/// `struct cpg_name`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cpg_name {
    pub length: u32,
    pub value: [c_char; CPG_MAX_NAME_LENGTH],
}

/// `struct cpg_address`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct cpg_address {
    pub nodeid: u32,
    pub pid: u32,
    pub reason: u32,
}

/// `struct cpg_ring_id`, passed by value to the totem confchg callback.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct cpg_ring_id {
    pub nodeid: u32,
    pub seq: u64,
}

/// `struct iovec` for `cpg_mcast_joined`.
#[repr(C)]
pub struct iovec {
    pub iov_base: *const c_void,
    pub iov_len: usize,
}

pub type cpg_deliver_fn_t = extern "C" fn(
    handle: cpg_handle_t,
    group_name: *const cpg_name,
    nodeid: u32,
    pid: u32,
    msg: *mut c_void,
    msg_len: usize,
);

pub type cpg_confchg_fn_t = extern "C" fn(
    handle: cpg_handle_t,
    group_name: *const cpg_name,
    member_list: *const cpg_address,
    member_list_entries: usize,
    left_list: *const cpg_address,
    left_list_entries: usize,
    joined_list: *const cpg_address,
    joined_list_entries: usize,
);

pub type cpg_totem_confchg_fn_t = extern "C" fn(
    handle: cpg_handle_t,
    ring_id: cpg_ring_id,
    member_list_entries: u32,
    member_list: *const u32,
);

/// `cpg_model_v1_data_t`. libcpg copies it during `cpg_model_initialize`.
#[repr(C)]
pub struct cpg_model_v1_data_t {
    pub model: c_uint,
    pub cpg_deliver_fn: Option<cpg_deliver_fn_t>,
    pub cpg_confchg_fn: Option<cpg_confchg_fn_t>,
    pub cpg_totem_confchg_fn: Option<cpg_totem_confchg_fn_t>,
    pub flags: c_uint,
}

#[link(name = "cpg")]
extern "C" {
    /// `model_data` really is a `cpg_model_data_t *` whose first field is the model; for
    /// `CPG_MODEL_V1` libcpg reads it as `cpg_model_v1_data_t`.
    pub fn cpg_model_initialize(
        handle: *mut cpg_handle_t,
        model: c_uint,
        model_data: *mut cpg_model_v1_data_t,
        context: *mut c_void,
    ) -> cs_error_t;
    pub fn cpg_finalize(handle: cpg_handle_t) -> cs_error_t;
    pub fn cpg_fd_get(handle: cpg_handle_t, fd: *mut c_int) -> cs_error_t;
    pub fn cpg_max_atomic_msgsize_get(handle: cpg_handle_t, size: *mut u32) -> cs_error_t;
    pub fn cpg_context_get(handle: cpg_handle_t, context: *mut *mut c_void) -> cs_error_t;
    pub fn cpg_context_set(handle: cpg_handle_t, context: *mut c_void) -> cs_error_t;
    pub fn cpg_dispatch(handle: cpg_handle_t, dispatch_types: c_uint) -> cs_error_t;
    pub fn cpg_join(handle: cpg_handle_t, group: *const cpg_name) -> cs_error_t;
    pub fn cpg_leave(handle: cpg_handle_t, group: *const cpg_name) -> cs_error_t;
    pub fn cpg_mcast_joined(
        handle: cpg_handle_t,
        guarantee: c_uint,
        iovec: *const iovec,
        iov_len: c_uint,
    ) -> cs_error_t;
    pub fn cpg_local_get(handle: cpg_handle_t, local_nodeid: *mut c_uint) -> cs_error_t;
    pub fn cpg_flow_control_state_get(handle: cpg_handle_t, state: *mut c_uint) -> cs_error_t;
}

/// Builds a `cpg_name` from a group name, refusing names corosync cannot carry.
pub fn make_cpg_name(name: &str) -> Result<cpg_name, String> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err("group name is empty".to_string());
    }
    if bytes.len() > CPG_MAX_NAME_LENGTH {
        return Err(format!(
            "group name {name:?} is {} bytes, corosync allows at most {CPG_MAX_NAME_LENGTH}",
            bytes.len()
        ));
    }
    if bytes.contains(&0) {
        return Err(format!("group name {name:?} contains a NUL byte"));
    }
    let mut value = [0 as c_char; CPG_MAX_NAME_LENGTH];
    for (dst, src) in value.iter_mut().zip(bytes) {
        *dst = *src as c_char;
    }
    Ok(cpg_name {
        length: bytes.len() as u32,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layouts_match_the_c_headers() {
        // x86_64 / aarch64 LP64 layouts of cpg.h.
        assert_eq!(std::mem::size_of::<cpg_name>(), 4 + 128);
        assert_eq!(std::mem::size_of::<cpg_address>(), 12);
        assert_eq!(std::mem::size_of::<cpg_ring_id>(), 16);
        assert_eq!(std::mem::align_of::<cpg_ring_id>(), 8);
        // model (int) + 3 fn pointers + flags (unsigned int), padded to pointer alignment.
        assert_eq!(std::mem::size_of::<cpg_model_v1_data_t>(), 40);
        assert_eq!(std::mem::size_of::<iovec>(), 16);
    }

    #[test]
    fn cpg_name_accepts_up_to_128_bytes() {
        let name = make_cpg_name("csnap:vol0").unwrap();
        assert_eq!(name.length, 10);
        assert_eq!(name.value[0] as u8, b'c');
        assert_eq!(name.value[10], 0);
        assert!(make_cpg_name(&"x".repeat(128)).is_ok());
        let err = make_cpg_name(&"x".repeat(129)).err().unwrap();
        assert!(err.contains("129 bytes"), "{err}");
        assert!(make_cpg_name("").is_err());
        assert!(make_cpg_name("a\0b").is_err());
    }
}
