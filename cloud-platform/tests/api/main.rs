//! The cloud platform API end to end, with real parties on loopback (`lab`): a cloud CA, a
//! TTP over mutual TLS with SQLite, the cloud platform itself, and for the attach test a
//! compute host with its own swtpm running the secure component agent. One test per
//! behaviour, each with its own lab, so that one failure hides no other.
//!
//! `domains`: create registers version 1 with the TTP and writes a sparse volume whose header
//! decodes; list is paginated and shows only the caller's domains; an update lands in the
//! other header slot while the old slot stays valid, and a torn write leaves the old header
//! in force; only the owner creates, changes and deletes (the CP refuses others by their TLS
//! identity); the TTP's refusals come back with the TTP's code; delete zeroes the header
//! area, removes the file and the TTP refuses the domain afterwards.
//! `hosts`: hosts and instances are the operator's; an attach to an unreachable host names it.
//! `attachments`: attach is forwarded to the instance's host; single writer; revoking a VM or
//! narrowing its mode detaches it on its host; a deletion while the host is down leaves the
//! attachment `detaching` until the detach is retried.

mod attachments;
mod domains;
mod hosts;
mod lab;
