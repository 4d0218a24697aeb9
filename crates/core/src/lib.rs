//! vmsnap core: domains, QEMU supervision, the state directory, the metadata
//! store and snapshot orchestration. Never prints to the terminal.

pub mod cmdline;
pub mod config;
pub mod disk;
pub mod domain;
pub mod error;
pub mod failpoint;
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
