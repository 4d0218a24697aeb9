//! A guest disk as QEMU sees it: a chain of image layers, the active one on
//! top. External snapshots push new layers; everything that starts QEMU or
//! records where a disk's data lives speaks in these types.
//!
//! # Block node naming (relied on by the snapshot code)
//!
//! Each layer has a *format node* (driver `qcow2` or `raw`) whose node name is
//! the layer's [`DiskLayer::node_name`], and a *protocol node* (driver `file`)
//! named `<node_name>-file` (see [`file_node_name`]). A disk defined from its
//! config starts as one layer with node name `vmsnap-<target>` (e.g.
//! `vmsnap-vda`, see [`default_node_name`]). The guest device has the id
//! `<target>` (e.g. `vda`, QOM path `/machine/peripheral/vda`) and is attached
//! to the top layer's format node. Layers added later (by snapshots) choose
//! their own node names; they must be unique within the domain, at most
//! [`MAX_NODE_NAME_LEN`] characters, start with a letter and use only
//! letters, digits, `-`, `_` and `.` (QEMU's rules, minus the room needed for
//! the `-file` suffix).

use std::path::PathBuf;

use crate::config::DiskFormat;

/// The longest format node name vmsnap accepts: QEMU allows 31 characters and
/// the protocol node appends `-file` (5).
pub const MAX_NODE_NAME_LEN: usize = 26;

/// One image in a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayer {
    /// Absolute path of the image file.
    pub path: PathBuf,
    /// Its format (declared or set by vmsnap when it created the image; never probed).
    pub format: DiskFormat,
    /// The QEMU node name of this layer's format node.
    pub node_name: String,
}

/// A guest disk: its target and its image layers, `layers[0]` being the
/// active layer the guest writes to and each following layer the backing of
/// the one before it. QEMU is told this chain explicitly and never follows a
/// backing file named inside an image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskChain {
    /// Guest-visible target (`vda`), also the QEMU device id.
    pub target: String,
    /// Active layer first, base image last. Never empty.
    pub layers: Vec<DiskLayer>,
}

impl DiskChain {
    /// The chain of a freshly defined disk: its image alone, with the default node name.
    pub fn single(target: &str, path: PathBuf, format: DiskFormat) -> DiskChain {
        DiskChain {
            target: target.to_string(),
            layers: vec![DiskLayer {
                path,
                format,
                node_name: default_node_name(target),
            }],
        }
    }

    /// The layer the guest writes to; `None` only for a chain built empty by
    /// hand, which the command-line builder refuses.
    pub fn active(&self) -> Option<&DiskLayer> {
        self.layers.first()
    }
}

/// Node name of the single layer of a disk defined from config: `vmsnap-<target>`.
pub fn default_node_name(target: &str) -> String {
    format!("vmsnap-{target}")
}

/// Node name of a layer's protocol (`file`) node: `<node_name>-file`.
pub fn file_node_name(node_name: &str) -> String {
    format!("{node_name}-file")
}

/// Checks a format node name against QEMU's rules and vmsnap's length budget.
pub fn check_node_name(node_name: &str) -> Result<(), String> {
    let mut chars = node_name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !first_ok || !rest_ok || node_name.len() > MAX_NODE_NAME_LEN {
        return Err(format!(
            "'{node_name}' is not a usable node name: start with a letter, use letters, digits, - _ . \
             and at most {MAX_NODE_NAME_LEN} characters"
        ));
    }
    Ok(())
}
