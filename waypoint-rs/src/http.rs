//! Per-request decisions, pure and without I/O: each module reads one kind of
//! L7 resource (`FromProto`) and decides from what the data path tells it.

pub mod authorization;
pub mod jwt;
