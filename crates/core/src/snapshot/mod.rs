//! Snapshot metadata: the record of each snapshot, the per-domain tree and
//! its virsh-compatible queries, virsh's text output, libvirt
//! domainsnapshot XML and xl snapshot configs. All pure: the orchestration
//! (QMP, the qcow2 engine, the store) builds on these.

pub mod error;
pub mod meta;
pub mod name;
pub mod orchestrate;
pub mod render;
pub mod tree;
pub mod xlcfg;
pub mod xml;

pub use error::{SnapshotMetaError, SnapshotMetaErrorKind};
pub use meta::{
    DiskSnapshotMode, DiskSnapshotRecord, MemorySnapshot, SnapshotKind, SnapshotMeta, SnapshotState,
};
pub use name::{default_snapshot_name, validate_snapshot_name};
pub use tree::{
    DeletePlan, DeleteScope, ListOutputOptions, ListQuery, Reparent, SnapshotSummary, SnapshotTree,
    TreeEntry,
};
pub use xlcfg::{parse_snapshot_document, parse_xl_snapshot_config, SnapshotDocumentFormat};
pub use xml::{
    parse_snapshot_xml, snapshot_to_xml, DiskRequest, DomainDiskSource, MemoryRequest,
    SnapshotDefinition,
};
