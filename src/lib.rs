//! Skydd's all-in-one pieces: a loopback lab (CA, TTP, compute hosts with swtpm) used by
//! the cross-party tests in tests/ and by the `skydd` launcher.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cloud;
pub mod guest;
pub mod lab;
pub mod story;
pub mod vms;
