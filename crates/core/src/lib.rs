//! vmsnap core: domains, QEMU supervision, the state directory, the metadata
//! store and snapshot orchestration. Never prints to the terminal.
//!
//! The pieces a command (or a library caller) goes through:
//!
//! * [`Host::open`] opens the state directory ([`StateDir`]) and the SQLite
//!   metadata [`Store`]; modules with their own tables call
//!   [`Store::migrate`] with their component name and [`store::Migration`]s,
//!   and write through [`Store::transaction`].
//! * [`Host::lock`] takes a domain's exclusive [`DomainLock`] (flock, freed
//!   if the process dies) and returns the freshly loaded [`Domain`]; every
//!   operation that changes the domain takes `&DomainLock`.
//! * [`Domain::start`] boots QEMU on the recorded [`DiskChain`]s;
//!   [`Domain::start_with_disks`] on explicit ones (e.g. new overlays above
//!   frozen images, with [`LaunchOptions::incoming_defer`] for a memory
//!   image). Node names and device ids are documented in [`disk`].
//! * [`Domain::connect_qmp`] gives a `vmsnap_qmp::Qmp` on the main monitor to
//!   the lock holder; [`Domain::state`] and [`Domain::block_stats`] use a
//!   second monitor and need no lock.
//!
//! ```no_run
//! # async fn demo() -> vmsnap_core::Result<()> {
//! use vmsnap_core::{Host, LaunchOptions, LockWait};
//! let host = Host::open(None)?;
//! let (lock, domain) = host.lock("demo", LockWait::Fail)?;
//! domain.start(host.store(), &lock, LaunchOptions::default()).await?;
//! let qmp = domain.connect_qmp(&lock).await?;
//! let status = qmp.query_status().await.map_err(|source| vmsnap_core::Error::Qmp {
//!     name: domain.name().to_string(),
//!     source,
//! })?;
//! # let _ = status; Ok(()) }
//! ```

pub mod cmdline;
pub mod config;
pub mod disk;
pub mod domain;
pub mod error;
pub mod failpoint;
pub mod kvm;
pub mod lock;
pub mod snapshot;
pub mod state;
pub mod store;

pub use cmdline::LaunchOptions;
pub use config::{Accel, DiskConfig, DiskFormat, DomainConfig};
pub use disk::{DiskChain, DiskLayer};
pub use domain::{DiskStats, Domain, DomainState, Host, QemuProcess};
pub use error::{Error, ErrorKind, Result};
pub use lock::{DomainLock, LockWait};
pub use state::{DomainPaths, StateDir};
pub use store::Store;
