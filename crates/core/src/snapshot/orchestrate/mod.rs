//! Snapshot orchestration: creating, reverting and deleting snapshots of
//! running and stopped domains, internal (inside qcow2 images) and external
//! (overlays plus a memory file), over QMP for running VMs and the qcow2
//! engine for stopped ones (DESIGN §4).
//!
//! Every multi-step operation writes an intent to the store's journal before
//! each step acts, and commits its outcome (records, current pointer, image
//! chains) in one transaction, so a killed process leaves either the
//! operation done or undone once the next command has recovered (DESIGN §5.4).

pub mod check;
pub mod error;
pub mod hugepages;
pub mod model;
mod offline;
mod ops;
pub mod plan;
mod recover;
pub mod runtime;
pub mod spec;
pub mod store;

pub use check::{
    CheckRepair, CheckReport, Finding, FindingKind, ImageReport, InternalSnapshot, Severity,
};
pub use error::{ErrorKind, Result, SnapshotError};
pub use model::{Chain, Chains, DiskCapture, Layer, SnapshotStorage};
pub use ops::{
    CreateOutcome, CreateRequest, DeleteOutcome, Orchestrator, Progress, ProgressFn, RevertMode,
    RevertOutcome,
};
pub use spec::{DiskSpec, MemSpec};
pub use store::{Change, Intent, OpenIntent, Operation, SnapshotStore, StoredSnapshot};
