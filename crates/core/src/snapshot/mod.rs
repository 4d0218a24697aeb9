//! Snapshot metadata and orchestration (being written).
