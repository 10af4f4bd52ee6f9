//! domain-manager
