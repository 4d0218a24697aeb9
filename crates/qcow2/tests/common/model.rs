//! An in-memory model of a disk and its internal snapshots: what every read, through our
//! engine or through `qemu-img`, must return.

/// One internal snapshot as the model expects QEMU to list it.
#[derive(Debug, Clone)]
pub struct ModelSnapshot {
    pub id: String,
    pub name: String,
    pub data: Vec<u8>,
}

/// The active disk bytes plus the snapshots in table order.
#[derive(Debug, Clone)]
pub struct DiskModel {
    pub active: Vec<u8>,
    pub snapshots: Vec<ModelSnapshot>,
}

impl DiskModel {
    /// A disk of `size` zero bytes and no snapshots.
    pub fn zeroed(size: u64) -> Self {
        DiskModel {
            active: vec![0; usize::try_from(size).expect("model size fits memory")],
            snapshots: Vec::new(),
        }
    }

    /// A disk whose initial bytes are `data`.
    pub fn with_data(data: Vec<u8>) -> Self {
        DiskModel {
            active: data,
            snapshots: Vec::new(),
        }
    }

    /// The snapshot names in table order.
    pub fn snapshot_names(&self) -> Vec<String> {
        self.snapshots.iter().map(|s| s.name.clone()).collect()
    }

    /// A guest write.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let start = usize::try_from(offset).expect("offset fits memory");
        self.active[start..start + data.len()].copy_from_slice(data);
    }

    /// The bytes a guest read must return.
    pub fn read(&self, offset: u64, len: usize) -> &[u8] {
        let start = usize::try_from(offset).expect("offset fits memory");
        &self.active[start..start + len]
    }

    /// The id QEMU gives the next snapshot: one more than the largest numeric id
    /// (so deleting the newest snapshot frees its id again).
    pub fn next_id(&self) -> String {
        let max = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        (max + 1).to_string()
    }

    /// Records a snapshot of the active state; returns its id.
    pub fn create_snapshot(&mut self, name: &str) -> String {
        let id = self.next_id();
        self.snapshots.push(ModelSnapshot {
            id: id.clone(),
            name: name.to_string(),
            data: self.active.clone(),
        });
        id
    }

    /// Makes the active state a copy of the named snapshot.
    pub fn apply_snapshot(&mut self, name: &str) {
        let snapshot = self.snapshot(name);
        self.active = snapshot.data.clone();
    }

    /// Forgets the named snapshot, keeping the order of the others.
    pub fn delete_snapshot(&mut self, name: &str) {
        let before = self.snapshots.len();
        self.snapshots.retain(|s| s.name != name);
        assert_eq!(
            before,
            self.snapshots.len() + 1,
            "model has snapshot {name}"
        );
    }

    /// The named snapshot.
    pub fn snapshot(&self, name: &str) -> &ModelSnapshot {
        self.snapshots
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("model has no snapshot {name}"))
    }
}
