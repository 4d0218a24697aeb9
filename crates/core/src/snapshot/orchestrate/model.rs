//! What a snapshot holds on storage, per disk and for memory, and the current
//! state's per-disk image chains. These records are what revert and delete act
//! on; the user-facing metadata (name, description, tree) lives in snapmeta's
//! types next to them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::DiskFormat;
use crate::disk::{DiskChain, DiskLayer};

/// One image of a disk's chain, always opened with its configured format and,
/// above the bottom, with an explicit backing reference to the layer below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Absolute path of the image file.
    pub file: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

impl Layer {
    /// A layer for `file` in `format`.
    pub fn new(file: impl Into<PathBuf>, format: DiskFormat) -> Layer {
        Layer {
            file: file.into(),
            format,
        }
    }
}

/// A disk's image chain, bottom (the configured disk file) first, the layer
/// the guest writes to last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain(pub Vec<Layer>);

impl Chain {
    /// The layer the guest writes to (or, in a snapshot, the captured one).
    pub fn top(&self) -> &Layer {
        self.0
            .last()
            .expect("a chain always holds its bottom layer")
    }

    /// Whether `file` is one of the chain's layers.
    pub fn contains(&self, file: &Path) -> bool {
        self.0.iter().any(|layer| layer.file == file)
    }

    /// The chain below `top()`.
    pub fn below_top(&self) -> &[Layer] {
        &self.0[..self.0.len() - 1]
    }

    /// This chain with `layer` added on top.
    pub fn with_top(&self, layer: Layer) -> Chain {
        let mut layers = self.0.clone();
        layers.push(layer);
        Chain(layers)
    }

    /// This chain with its top replaced by `layer`.
    pub fn replace_top(&self, layer: Layer) -> Chain {
        let mut layers = self.below_top().to_vec();
        layers.push(layer);
        Chain(layers)
    }
}

/// The current state of a domain's disks: one chain per disk target.
pub type Chains = BTreeMap<String, Chain>;

/// How one disk was captured by a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DiskCapture {
    /// An internal snapshot named `tag` inside the top layer of `chain`.
    Internal {
        /// The chain whose top image holds the internal snapshot.
        chain: Chain,
        /// The internal snapshot's name inside that image.
        tag: String,
    },
    /// The top layer of `chain` was frozen at the snapshot's instant; it is
    /// never written again while this snapshot (or an overlay on it) exists.
    External {
        /// The frozen image and the chain below it.
        chain: Chain,
    },
    /// The disk is not part of the snapshot.
    Excluded,
}

impl DiskCapture {
    /// The chain a revert rebuilds the disk from, if the disk was captured.
    pub fn chain(&self) -> Option<&Chain> {
        match self {
            DiskCapture::Internal { chain, .. } | DiskCapture::External { chain } => Some(chain),
            DiskCapture::Excluded => None,
        }
    }
}

/// Everything vmsnap needs, beyond snapmeta's record, to revert to or delete
/// a snapshot: the full image chain of every captured disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStorage {
    /// Per disk target, how it was captured.
    pub disks: BTreeMap<String, DiskCapture>,
}

impl SnapshotStorage {
    /// Every image file whose content this snapshot needs.
    pub fn image_files(&self) -> impl Iterator<Item = &Path> {
        self.disks
            .values()
            .filter_map(DiskCapture::chain)
            .flat_map(|chain| chain.0.iter().map(|layer| layer.file.as_path()))
    }
}

/// A recorded current chain (active layer first, with QEMU node names) as a
/// base-first [`Chain`].
pub fn chain_of(disk: &DiskChain) -> Chain {
    Chain(
        disk.layers
            .iter()
            .rev()
            .map(|layer| Layer::new(layer.path.clone(), layer.format))
            .collect(),
    )
}

/// All recorded current chains, by target.
pub fn chains_of(disks: &[DiskChain]) -> Chains {
    disks
        .iter()
        .map(|disk| (disk.target.clone(), chain_of(disk)))
        .collect()
}

/// A QEMU node name for `file` in disk `target`: derived from the path so it
/// is unique within a domain (one file is never opened twice) and stable
/// across launches, and short enough for QEMU's limit with the `-file` suffix.
pub fn node_name_for(target: &str, file: &Path) -> String {
    // FNV-1a over the path bytes.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in file.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let short_target: String = target.chars().take(12).collect();
    format!("n{short_target}-{:08x}", hash as u32)
}

/// `chain` as a recorded current chain of `target`, keeping the node names
/// `running` gives layers QEMU has open and naming the others by path.
pub fn disk_chain_of(target: &str, chain: &Chain, running: Option<&DiskChain>) -> DiskChain {
    let layers = chain
        .0
        .iter()
        .rev()
        .map(|layer| {
            let node_name = running
                .and_then(|disk| disk.layers.iter().find(|l| l.path == layer.file))
                .map(|l| l.node_name.clone())
                .unwrap_or_else(|| node_name_for(target, &layer.file));
            DiskLayer {
                path: layer.file.clone(),
                format: layer.format,
                node_name,
            }
        })
        .collect();
    DiskChain {
        target: target.to_string(),
        layers,
    }
}
