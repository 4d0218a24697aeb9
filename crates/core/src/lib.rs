//! vmsnap core: domains, QEMU supervision, the state directory, the metadata
//! store and snapshot orchestration. Never prints to the terminal.

pub mod snapshot;
