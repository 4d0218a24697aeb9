//! An async QMP client for QEMU.
//!
//! vmsnap drives running VMs through QMP: pausing, snapshot jobs, migration
//! to a memory file, block statistics. This crate gives it one connection per
//! VM that never loses a reply (commands carry ids and may overlap) or an
//! event (a broadcast stream, with job and migration waits that also poll so
//! nothing that happened before the wait is missed), and that fails fast with
//! [`Error::Disconnected`] once QEMU is gone.
//!
//! All replies and events are decoded tolerantly: unknown fields are ignored
//! and unknown enum values are kept as `Other(String)`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vmsnap_qmp::Error> {
//! use std::{path::Path, time::Duration};
//! let qmp = vmsnap_qmp::Qmp::connect(Path::new("/run/vm/qmp.sock"), Duration::from_secs(5)).await?;
//! let mut events = qmp.events();
//! qmp.stop().await?;
//! qmp.wait_event(&mut events, "STOP", |_| true, Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod client;
mod error;
mod protocol;
mod types;

pub use client::{ClientStats, EventReceiver, Qmp, DEFAULT_COMMAND_TIMEOUT};
pub use error::{Error, ErrorKind};
pub use protocol::{Event, Greeting, Timestamp, Version};
pub use types::{
    BlockDeviceInfo, BlockDeviceStats, BlockInfo, BlockStats, ImageInfo, JobInfo, JobStatus,
    JobType, MigrationInfo, MigrationRamStats, MigrationStatus, RunState, SnapshotInfo, StatusInfo,
};
