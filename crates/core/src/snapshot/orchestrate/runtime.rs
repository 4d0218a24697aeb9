//! Small helpers for talking to a domain's QEMU: error wrapping, quoting for
//! `exec:` migration URIs, and reading the block graph QEMU really has.

use std::path::{Path, PathBuf};

use vmsnap_qmp::Qmp;

use super::error::{Result, SnapshotError};

/// Wraps a QMP failure with the domain and the command.
pub fn qmp_error(domain: &str, command: &str) -> impl FnOnce(vmsnap_qmp::Error) -> SnapshotError {
    let domain = domain.to_string();
    let command = command.to_string();
    move |source| SnapshotError::Qemu {
        domain,
        command,
        source: Box::new(source),
    }
}

/// The chains QEMU really has open, per device, active layer first: what a
/// recovery adopts when a killed vmsnap left QEMU on layers it never recorded.
pub async fn live_chains(domain: &str, qmp: &Qmp) -> Result<Vec<(String, Vec<(String, PathBuf)>)>> {
    let nodes = qmp
        .query_named_block_nodes()
        .await
        .map_err(qmp_error(domain, "query-named-block-nodes"))?;
    let blocks = qmp
        .query_block()
        .await
        .map_err(qmp_error(domain, "query-block"))?;
    let mut out = Vec::new();
    for block in blocks {
        let Some(inserted) = block.inserted else {
            continue;
        };
        let target = block
            .qdev
            .as_deref()
            .and_then(|q| q.rsplit('/').nth(1).map(str::to_string))
            .filter(|t| !t.is_empty())
            .unwrap_or(block.device.clone());
        let mut layers = vec![(inserted.node_name.clone(), PathBuf::from(&inserted.file))];
        let mut backing = inserted
            .image
            .as_ref()
            .and_then(|i| i.backing_image.clone());
        while let Some(image) = backing {
            let node = nodes
                .iter()
                .find(|n| n.file == image.filename && matches!(n.drv.as_str(), "qcow2" | "raw"))
                .map(|n| n.node_name.clone())
                .unwrap_or_default();
            layers.push((node, PathBuf::from(&image.filename)));
            backing = image.backing_image;
        }
        out.push((target, layers));
    }
    Ok(out)
}

/// Shell-quotes a path for an `exec:` migration URI.
pub fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', "'\\''"))
}
