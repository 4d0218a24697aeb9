//! Fuzzes the engine's writing paths on whole image files: open for writing, take an
//! internal snapshot, write through copy-on-write, apply and delete snapshots (walking
//! the snapshot table, every L1 and L2 table), then `check -r all`. Nothing may panic,
//! and a refused snapshot create must leave every byte of the file as it was.
//! Images live on /dev/shm when it exists, so syncs cost nothing.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use vmsnap_qcow2::{BackingPolicy, OpenOptions, Qcow2Image, RepairMode};

fn image_path() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    let dir = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("vmsnap-fuzz-ops-{}.qcow2", std::process::id()))
}

fn file_bytes(path: &PathBuf) -> Vec<u8> {
    std::fs::read(path).expect("read fuzz image back")
}

fuzz_target!(|data: &[u8]| {
    let path = image_path();
    std::fs::write(&path, data).expect("write fuzz image");
    let options = OpenOptions {
        writable: true,
        backing: BackingPolicy::Ignore,
    };
    if let Ok(mut image) = Qcow2Image::open(&path, options) {
        // Opening may repair a dirty image; what follows is judged from here.
        if image.flush().is_ok() {
            let existing: Vec<String> = image.snapshots().into_iter().map(|s| s.id).collect();
            let before = file_bytes(&path);
            match image.create_snapshot("fuzz") {
                Err(e) => assert!(
                    file_bytes(&path) == before,
                    "a refused snapshot create changed the image: {e}"
                ),
                Ok(_) => {
                    let _ = image.write_at(0, &[0xa5; 4096]);
                    let _ = image.write_at(image.size().saturating_sub(1), &[0x5a]);
                    let _ = image.apply_snapshot("fuzz");
                    let _ = image.delete_snapshot("fuzz");
                }
            }
            // Apply and delete may stop half-way on refcounts too low for what references
            // them (leaving leaks, as QEMU does); they must not panic.
            if let Some(id) = existing.first() {
                let _ = image.apply_snapshot(id);
                let _ = image.delete_snapshot(id);
            }
            let _ = image.check(Some(RepairMode::All));
        }
    }
    let _ = std::fs::remove_file(&path);
});
