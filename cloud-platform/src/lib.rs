//! cloud-platform
