//! cloud-platform

pub mod ca;
