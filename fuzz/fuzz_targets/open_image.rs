//! Fuzzes the engine on whole image files: opening read-only, listing snapshots, reading
//! guest data and checking must fail cleanly on any input, and never write to the file.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use vmsnap_qcow2::{BackingPolicy, OpenOptions, Qcow2Image};

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("vmsnap-fuzz-open-{}.qcow2", std::process::id()));
    {
        let mut file = std::fs::File::create(&path).expect("create fuzz image");
        file.write_all(data).expect("write fuzz image");
    }
    let options = OpenOptions {
        writable: false,
        backing: BackingPolicy::Ignore,
    };
    if let Ok(mut image) = Qcow2Image::open(&path, options) {
        let _ = image.snapshots();
        let mut buf = vec![0u8; 4096];
        for offset in [0u64, 512, 65536, 1 << 20, 1 << 30] {
            let _ = image.read_at(offset, &mut buf);
        }
        let _ = image.check(None);
    }
    let after = std::fs::read(&path).expect("read fuzz image back");
    assert!(after == data, "a read-only open changed the file");
    let _ = std::fs::remove_file(&path);
});
