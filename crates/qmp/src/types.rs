//! Typed replies of the QMP commands vmsnap uses. Every struct ignores fields
//! it does not know and defaults the ones QEMU leaves out; every enum keeps a
//! value it does not know as `Other(String)`, so a newer QEMU never breaks a
//! decode.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Declares a QAPI string enum that keeps unknown values as `Other`.
macro_rules! qapi_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A value this version of vmsnap does not know, kept verbatim.
            Other(String),
        }

        impl $name {
            /// The QAPI spelling of this value.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $text, )*
                    $name::Other(text) => text,
                }
            }

            /// Parses the QAPI spelling; unknown text becomes `Other`.
            pub fn from_qapi(text: &str) -> Self {
                match text {
                    $( $text => $name::$variant, )*
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Ok($name::from_qapi(&text))
            }
        }
    };
}

qapi_enum! {
    /// The VM run state from `query-status` (QAPI `RunState`).
    #[derive(Default)]
    pub enum RunState {
        /// Stopped by a debugger.
        Debug => "debug",
        /// Waiting for an incoming migration.
        InMigrate => "inmigrate",
        /// Stopped by an internal error.
        InternalError => "internal-error",
        /// Stopped by a disk I/O error (werror/rerror=stop).
        IoError => "io-error",
        /// Paused by `stop` or `-S` after boot.
        Paused => "paused",
        /// Stopped after an outgoing migration completed.
        PostMigrate => "postmigrate",
        /// Started with `-S`, never run yet.
        #[default]
        Prelaunch => "prelaunch",
        /// Finishing an outgoing migration.
        FinishMigrate => "finish-migrate",
        /// Loading a snapshot.
        RestoreVm => "restore-vm",
        /// Running guest code.
        Running => "running",
        /// Saving a snapshot.
        SaveVm => "save-vm",
        /// Guest shut down (with `-no-shutdown`).
        Shutdown => "shutdown",
        /// Guest suspended (ACPI S3).
        Suspended => "suspended",
        /// Stopped by a watchdog action.
        Watchdog => "watchdog",
        /// Guest panicked.
        GuestPanicked => "guest-panicked",
        /// COLO fault tolerance state.
        Colo => "colo",
    }
}

qapi_enum! {
    /// A job's state in `query-jobs` and `JOB_STATUS_CHANGE` (QAPI `JobStatus`).
    #[derive(Default)]
    pub enum JobStatus {
        /// Not yet set up.
        #[default]
        Undefined => "undefined",
        /// Created, not started.
        Created => "created",
        /// Working.
        Running => "running",
        /// Paused by the user.
        Paused => "paused",
        /// Ready to be completed (mirror-style jobs).
        Ready => "ready",
        /// Paused while ready.
        Standby => "standby",
        /// Waiting for other jobs of a transaction.
        Waiting => "waiting",
        /// Waiting for `job-finalize`.
        Pending => "pending",
        /// Being cancelled or failing.
        Aborting => "aborting",
        /// Finished; result readable until `job-dismiss`.
        Concluded => "concluded",
        /// Dismissed; about to disappear.
        Null => "null",
    }
}

qapi_enum! {
    /// The kind of a job (QAPI `JobType`).
    #[derive(Default)]
    pub enum JobType {
        /// block-commit.
        Commit => "commit",
        /// block-stream.
        Stream => "stream",
        /// drive-mirror / blockdev-mirror.
        Mirror => "mirror",
        /// drive-backup / blockdev-backup.
        Backup => "backup",
        /// blockdev-create.
        #[default]
        Create => "create",
        /// x-blockdev-amend.
        Amend => "amend",
        /// snapshot-load.
        SnapshotLoad => "snapshot-load",
        /// snapshot-save.
        SnapshotSave => "snapshot-save",
        /// snapshot-delete.
        SnapshotDelete => "snapshot-delete",
    }
}

qapi_enum! {
    /// Migration state from `query-migrate` and `MIGRATION` events.
    #[derive(Default)]
    pub enum MigrationStatus {
        /// No migration started.
        #[default]
        None => "none",
        /// Setting up.
        Setup => "setup",
        /// Being cancelled.
        Cancelling => "cancelling",
        /// Cancelled.
        Cancelled => "cancelled",
        /// Sending state.
        Active => "active",
        /// Post-copy phase.
        PostcopyActive => "postcopy-active",
        /// Post-copy paused by a network failure.
        PostcopyPaused => "postcopy-paused",
        /// Post-copy recovering.
        PostcopyRecover => "postcopy-recover",
        /// Completed successfully.
        Completed => "completed",
        /// Failed; `error-desc` says why.
        Failed => "failed",
        /// COLO state.
        Colo => "colo",
        /// Paused before switchover (pause-before-switchover capability).
        PreSwitchover => "pre-switchover",
        /// Migrating device state.
        Device => "device",
        /// Waiting for devices to unplug.
        WaitUnplug => "wait-unplug",
    }
}

impl MigrationStatus {
    /// Whether the migration has ended (successfully or not) and will not
    /// change state any more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// Reply of `query-status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusInfo {
    /// Whether guest code is executing.
    pub running: bool,
    /// The detailed run state.
    pub status: RunState,
}

/// One job from `query-jobs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job id given when it was created.
    pub id: String,
    /// What kind of job.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Current state.
    pub status: JobStatus,
    /// Progress so far, in units of `total_progress`.
    pub current_progress: u64,
    /// Estimated total work.
    pub total_progress: u64,
    /// Set once the job concluded with an error.
    pub error: Option<String>,
}

/// RAM transfer statistics of a migration (QAPI `MigrationStats`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct MigrationRamStats {
    /// Bytes transferred.
    pub transferred: u64,
    /// Bytes remaining.
    pub remaining: u64,
    /// Total guest RAM bytes.
    pub total: u64,
    /// Pages that were all zero.
    pub duplicate: u64,
    /// Pages sent in full.
    pub normal: u64,
    /// Bytes sent as full pages.
    pub normal_bytes: u64,
    /// Pages dirtied per second.
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// Dirty bitmap syncs done.
    pub dirty_sync_count: u64,
    /// Guest page size in bytes.
    pub page_size: u64,
    /// Bytes sent while the guest still ran.
    pub precopy_bytes: u64,
    /// Bytes sent during the final downtime.
    pub downtime_bytes: u64,
}

/// Reply of `query-migrate`; also the result of [`crate::Qmp::wait_migration`].
/// Times are in milliseconds, as QEMU reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// State; `None` when no migration was ever started.
    pub status: Option<MigrationStatus>,
    /// RAM statistics, present once the migration started.
    pub ram: Option<MigrationRamStats>,
    /// Milliseconds from start to completion (or so far).
    pub total_time: Option<i64>,
    /// Milliseconds the guest was stopped, once completed.
    pub downtime: Option<i64>,
    /// Expected downtime while still active.
    pub expected_downtime: Option<i64>,
    /// Milliseconds spent in setup.
    pub setup_time: Option<i64>,
    /// Why the migration failed.
    pub error_desc: Option<String>,
}

/// One snapshot inside an image (QAPI `SnapshotInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// Numeric id string.
    pub id: String,
    /// Snapshot name (tag).
    pub name: String,
    /// Bytes of VM state stored with it (0 for disk-only).
    pub vm_state_size: u64,
    /// Creation time, seconds.
    pub date_sec: i64,
    /// Creation time, nanoseconds part.
    pub date_nsec: i64,
    /// Guest clock at creation, seconds.
    pub vm_clock_sec: i64,
    /// Guest clock at creation, nanoseconds part.
    pub vm_clock_nsec: i64,
}

/// What QEMU knows about an image (QAPI `ImageInfo`, the fields we use).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Image file name.
    pub filename: String,
    /// Format driver (`qcow2`, `raw`, `file`, ...).
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: Option<u64>,
    /// Cluster size, for formats that have one.
    pub cluster_size: Option<u64>,
    /// Backing file name as stored in the image.
    pub backing_filename: Option<String>,
    /// Internal snapshots.
    pub snapshots: Option<Vec<SnapshotInfo>>,
    /// The backing image, recursively.
    pub backing_image: Option<Box<ImageInfo>>,
}

/// A block node as `query-block`'s `inserted` and `query-named-block-nodes`
/// report it (QAPI `BlockDeviceInfo`, the fields we use).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockDeviceInfo {
    /// Node name (`-blockdev node-name=`), auto-generated ones start with `#`.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// File name (or JSON filename) of the node.
    pub file: String,
    /// Driver of this node.
    pub drv: String,
    /// Whether the node is read-only.
    pub ro: bool,
    /// Backing file name, when the node has one.
    pub backing_file: Option<String>,
    /// Depth of the backing chain.
    pub backing_file_depth: u64,
    /// Image information (with snapshots) when QEMU includes it.
    pub image: Option<ImageInfo>,
}

/// One device from `query-block`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockInfo {
    /// BlockBackend name; empty for devices created with `-device ...,drive=node`.
    pub device: String,
    /// The guest device's qdev id or QOM path.
    pub qdev: Option<String>,
    /// Whether the medium is removable.
    pub removable: bool,
    /// Whether the medium is locked by the guest.
    pub locked: bool,
    /// The medium's top node, when one is inserted.
    pub inserted: Option<BlockDeviceInfo>,
    /// `ok`, `failed` or `nospace`, when error reporting is on.
    #[serde(rename = "io-status")]
    pub io_status: Option<String>,
}

/// I/O counters of one device or node (QAPI `BlockDeviceStats`, the fields
/// `domblkstat` shows).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockDeviceStats {
    /// Bytes read.
    pub rd_bytes: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Read requests.
    pub rd_operations: u64,
    /// Write requests.
    pub wr_operations: u64,
    /// Flush requests.
    pub flush_operations: u64,
    /// Total nanoseconds spent reading.
    pub rd_total_time_ns: u64,
    /// Total nanoseconds spent writing.
    pub wr_total_time_ns: u64,
    /// Total nanoseconds spent flushing.
    pub flush_total_time_ns: u64,
    /// Highest offset written.
    pub wr_highest_offset: u64,
}

/// One entry of `query-blockstats`: a device (or, with `query-nodes`, a node)
/// with its statistics and those of the nodes below it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockStats {
    /// BlockBackend name; QEMU sends an empty string for anonymous backends.
    pub device: Option<String>,
    /// The guest device's qdev id or QOM path.
    pub qdev: Option<String>,
    /// Node name of the top node.
    #[serde(rename = "node-name")]
    pub node_name: Option<String>,
    /// The counters.
    pub stats: BlockDeviceStats,
    /// Statistics of the protocol node below (e.g. the `file` node under qcow2).
    pub parent: Option<Box<BlockStats>>,
    /// Statistics of the backing node.
    pub backing: Option<Box<BlockStats>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn enums_keep_unknown_values() {
        let status: StatusInfo =
            serde_json::from_value(json!({"running": false, "status": "hibernating", "x": 1}))
                .unwrap();
        assert_eq!(status.status, RunState::Other("hibernating".into()));
        assert_eq!(status.status.as_str(), "hibernating");
        let status: StatusInfo = serde_json::from_value(
            json!({"running": true, "singlestep": false, "status": "running"}),
        )
        .unwrap();
        assert_eq!(status.status, RunState::Running);
        assert!(status.running);
        assert_eq!(
            serde_json::to_value(RunState::PostMigrate).unwrap(),
            json!("postmigrate")
        );
    }

    #[test]
    fn jobs_parse_with_and_without_error() {
        let jobs: Vec<JobInfo> = serde_json::from_value(json!([
            {"current-progress": 1, "status": "concluded", "total-progress": 1,
             "type": "snapshot-save", "id": "s1"},
            {"current-progress": 0, "status": "concluded", "total-progress": 1,
             "type": "create", "id": "c1", "error": "Cluster size must be a power of two"},
            {"status": "brand-new", "type": "teleport", "id": "t"}
        ]))
        .unwrap();
        assert_eq!(jobs[0].job_type, JobType::SnapshotSave);
        assert_eq!(jobs[0].status, JobStatus::Concluded);
        assert_eq!(jobs[0].error, None);
        assert_eq!(
            jobs[1].error.as_deref(),
            Some("Cluster size must be a power of two")
        );
        assert_eq!(jobs[2].status, JobStatus::Other("brand-new".into()));
        assert_eq!(jobs[2].job_type, JobType::Other("teleport".into()));
    }

    #[test]
    fn migration_info_parses_completed_and_empty() {
        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "completed", "setup-time": 1, "downtime": 12, "total-time": 150,
            "ram": {"total": 33685504, "transferred": 1234, "mbps": 850.5, "normal": 3,
                    "dirty-sync-count": 2, "page-size": 4096, "multifd-bytes": 0},
            "blocked-reasons": []
        }))
        .unwrap();
        assert_eq!(info.status, Some(MigrationStatus::Completed));
        assert_eq!(info.downtime, Some(12));
        assert_eq!(info.total_time, Some(150));
        let ram = info.ram.unwrap();
        assert_eq!(ram.total, 33_685_504);
        assert_eq!(ram.mbps, 850.5);
        let empty: MigrationInfo = serde_json::from_value(json!({})).unwrap();
        assert_eq!(empty.status, None);
        assert!(MigrationStatus::Failed.is_terminal());
        assert!(!MigrationStatus::Active.is_terminal());
    }

    #[test]
    fn blockstats_parse_nested_nodes() {
        let stats: Vec<BlockStats> = serde_json::from_value(json!([{
            "device": "", "node-name": "d0", "qdev": "/machine/peripheral/vda/virtio-backend",
            "stats": {"rd_bytes": 512, "wr_bytes": 4096, "rd_operations": 1, "wr_operations": 2,
                      "flush_operations": 3, "rd_total_time_ns": 10, "wr_total_time_ns": 20,
                      "flush_total_time_ns": 30, "timed_stats": [], "account_invalid": true},
            "parent": {"node-name": "f0", "stats": {"wr_bytes": 8192}}
        }]))
        .unwrap();
        assert_eq!(stats[0].device.as_deref(), Some(""));
        assert_eq!(stats[0].node_name.as_deref(), Some("d0"));
        assert_eq!(stats[0].stats.wr_operations, 2);
        assert_eq!(stats[0].stats.flush_total_time_ns, 30);
        assert_eq!(stats[0].parent.as_ref().unwrap().stats.wr_bytes, 8192);
    }
}
