//! Domain lifecycle against real qemu-system-x86_64 and the test guest (TCG).

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmsnap_core::{DomainState, ErrorKind, Host, LaunchOptions, LockWait, QemuProcess};
use vmsnap_testguest::lab::{self, DiskDef};
use vmsnap_testguest::Guest;

/// A temporary state directory plus images and a config for one domain.
struct Bench {
    dir: tempfile::TempDir,
    host: Host,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::Builder::new()
            .prefix("vmsnap-dom")
            .tempdir()
            .unwrap();
        let host = Host::open(Some(&dir.path().join("state"))).unwrap();
        Bench { dir, host }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ctl_socket(&self) -> PathBuf {
        self.path("ctl.sock")
    }

    /// Writes a config for the test guest with a qcow2 vda and a raw vdb, and
    /// `extra_qemu_args` for QEMU.
    fn write_config(&self, name: &str, extra_qemu_args: &[&str]) -> PathBuf {
        lab::create_qcow2(&self.path("vda.qcow2"), "64M");
        // vdb is declared raw but holds a qcow2 header (pointing at a backing
        // file): it must reach the guest as raw bytes, never be probed.
        let vdb = self.path("vdb.raw");
        lab::qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/passwd",
            "-F",
            "raw",
            vdb.to_str().unwrap(),
            "16M",
        ]);
        let file = fs::OpenOptions::new().write(true).open(&vdb).unwrap();
        file.set_len(16 << 20).unwrap();
        let config = lab::guest_domain_toml(
            name,
            256,
            &self.ctl_socket(),
            extra_qemu_args,
            &[
                DiskDef::qcow2("vda", "vda.qcow2"),
                DiskDef::raw("vdb", "vdb.raw"),
            ],
        );
        let path = self.path(&format!("{name}.toml"));
        fs::write(&path, config).unwrap();
        path
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // Never leave a QEMU behind, whatever the test did.
        if let Ok(domains) = self.host.domains() {
            for domain in domains {
                if let Ok(QemuProcess::Alive(pid)) = domain.process() {
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
    }
}

/// Starts paused: the guest need not boot for these checks.
const PAUSED: LaunchOptions = LaunchOptions {
    paused: true,
    incoming_defer: false,
};

#[tokio::test]
async fn define_start_io_suspend_resume_destroy_undefine() {
    let bench = Bench::new();
    let config = bench.write_config("life", &[]);
    let domain = bench.host.define(&config, LockWait::Fail).unwrap();
    assert_eq!(domain.name(), "life");
    assert_eq!(domain.disks().len(), 2);
    assert_eq!(domain.disks()[0].layers[0].node_name, "vmsnap-vda");
    assert_eq!(domain.state().await.unwrap(), DomainState::ShutOff);
    let again = bench.host.define(&config, LockWait::Fail).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::AlreadyExists);

    let (lock, domain) = bench.host.lock("life", LockWait::Fail).unwrap();
    let id = domain
        .start(bench.host.store(), &lock, LaunchOptions::default())
        .await
        .unwrap();
    assert!(id >= 1);
    assert_eq!(domain.state().await.unwrap(), DomainState::Running);
    let QemuProcess::Alive(_) = domain.process().unwrap() else {
        panic!("QEMU not alive")
    };

    // Starting it again is refused and leaves the running QEMU alone.
    let err = domain
        .start(bench.host.store(), &lock, LaunchOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidState);
    assert_eq!(
        err.to_string(),
        "cannot start domain 'life': it is already running"
    );
    assert_eq!(domain.state().await.unwrap(), DomainState::Running);

    // Runtime files are private.
    use std::os::unix::fs::PermissionsExt;
    for file in [
        &domain.paths().pid_file,
        &domain.paths().serial_log,
        &domain.paths().qmp_socket,
    ] {
        let mode = fs::metadata(file).unwrap().permissions().mode() & 0o077;
        assert_eq!(mode, 0, "{} is accessible to others", file.display());
    }

    // The guest writes; QEMU's counters for that disk grow.
    let mut guest = Guest::connect(bench.ctl_socket(), Duration::from_secs(90)).unwrap();
    let before = domain.block_stats().await.unwrap();
    assert_eq!(
        before.iter().map(|s| s.target.as_str()).collect::<Vec<_>>(),
        ["vda", "vdb"]
    );
    let raw_head = fs::read(bench.path("vdb.raw")).unwrap()[..64 << 10].to_vec();
    assert_eq!(&raw_head[..4], b"QFI\xfb");
    assert_eq!(
        guest.disk_checksum("vdb", 0, 64 << 10).unwrap(),
        vmsnap_testguest::sha256_hex(&raw_head),
        "a raw disk that looks like qcow2 is shown to the guest as raw"
    );
    guest.write_pattern("vda", 1 << 20, 256 << 10, 7).unwrap();
    guest.write_pattern("vdb", 0, 64 << 10, 8).unwrap();
    let after = domain.block_stats().await.unwrap();
    assert!(
        after[0].wr_bytes >= before[0].wr_bytes + (256 << 10),
        "{before:?} -> {after:?}"
    );
    assert!(after[0].wr_req > before[0].wr_req);
    assert!(after[1].wr_bytes >= before[1].wr_bytes + (64 << 10));
    assert!(
        after[0].rd_req > 0,
        "the guest read its partition table at boot"
    );

    // A QMP command QEMU does not know comes back as a typed error.
    let err = domain
        .qmp_command(&lock, "bogus-command", None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Qmp);
    match &err {
        vmsnap_core::Error::Qmp { source, .. } => {
            assert_eq!(source.qmp_class(), Some("CommandNotFound"))
        }
        other => panic!("unexpected {other:?}"),
    }
    // While the lock holder keeps its QMP connection open (a long snapshot,
    // say), lock-free readers still get answers on the query monitor.
    let held = domain.connect_qmp(&lock).await.unwrap();
    let asked = Instant::now();
    assert_eq!(domain.state().await.unwrap(), DomainState::Running);
    assert_eq!(domain.block_stats().await.unwrap().len(), 2);
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert!(held.query_status().await.unwrap().running);
    held.close().await;
    let version = domain
        .qmp_command(&lock, "query-version", None)
        .await
        .unwrap();
    assert_eq!(version["qemu"]["major"], 7);

    domain.suspend(&lock).await.unwrap();
    assert_eq!(domain.state().await.unwrap(), DomainState::Paused);
    domain.resume(&lock).await.unwrap();
    assert_eq!(domain.state().await.unwrap(), DomainState::Running);
    let counter = guest.counter().unwrap();
    assert!(counter > 0);

    domain.destroy(bench.host.store(), &lock).await.unwrap();
    assert_eq!(domain.process().unwrap(), QemuProcess::NotRunning);
    assert!(!domain.paths().qmp_socket.exists());
    assert!(!domain.paths().query_socket.exists());
    let domain = bench.host.domain("life").unwrap();
    assert_eq!(domain.state().await.unwrap(), DomainState::ShutOff);
    let err = domain.destroy(bench.host.store(), &lock).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidState);
    drop(lock);

    // Metadata another component keeps about the domain blocks undefine unless dropped on purpose.
    const NOTES: &[vmsnap_core::store::Migration] = &[vmsnap_core::store::Migration {
        version: 1,
        sql:
            "CREATE TABLE notes (domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE);",
    }];
    let store = bench.host.store();
    store.migrate("notes", NOTES).unwrap();
    store
        .transaction(|tx| {
            tx.execute("INSERT INTO notes VALUES ('life')", [])
                .map_err(vmsnap_core::store::sql("insert note"))
        })
        .unwrap();
    let err = bench
        .host
        .undefine("life", LockWait::Fail, false)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidState);
    assert!(err.to_string().contains("1 in notes"), "{err}");
    assert!(bench.host.domain("life").is_ok());
    bench.host.undefine("life", LockWait::Fail, true).unwrap();
    assert_eq!(
        bench.host.domain("life").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(!domain.paths().dir.exists());
    assert!(
        bench.path("vda.qcow2").exists(),
        "undefine keeps the images"
    );
}

#[tokio::test]
async fn sigkilled_qemu_is_reported_crashed_and_cleaned_up() {
    let bench = Bench::new();
    let config = bench.write_config("crash", &[]);
    bench.host.define(&config, LockWait::Fail).unwrap();
    let (lock, domain) = bench.host.lock("crash", LockWait::Fail).unwrap();
    domain
        .start(bench.host.store(), &lock, PAUSED)
        .await
        .unwrap();
    assert_eq!(domain.state().await.unwrap(), DomainState::Paused);
    let QemuProcess::Alive(pid) = domain.process().unwrap() else {
        panic!("QEMU not alive")
    };
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let killed = Instant::now();
    while domain.process().unwrap() != QemuProcess::Gone(pid) {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "QEMU did not die"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = Instant::now();
    assert_eq!(domain.state().await.unwrap(), DomainState::Crashed);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "state must not hang on a dead QEMU"
    );
    assert!(domain.paths().pid_file.exists(), "readers change nothing");

    assert_eq!(
        domain.reconcile(bench.host.store(), &lock).unwrap(),
        QemuProcess::Gone(pid)
    );
    assert!(!domain.paths().pid_file.exists());
    assert!(!domain.paths().qmp_socket.exists());
    let domain = bench.host.domain("crash").unwrap();
    assert_eq!(
        domain.last_exit(),
        Some(vmsnap_core::store::LastExit::Crashed)
    );
    assert_eq!(domain.state().await.unwrap(), DomainState::Crashed);

    // It starts again from the crashed state, and the crash mark goes away.
    domain
        .start(bench.host.store(), &lock, PAUSED)
        .await
        .unwrap();
    let domain = bench.host.domain("crash").unwrap();
    assert_eq!(domain.last_exit(), None);
    assert_eq!(domain.state().await.unwrap(), DomainState::Paused);
    domain.destroy(bench.host.store(), &lock).await.unwrap();
}

#[tokio::test]
async fn qemu_start_failure_shows_stderr_and_leaves_nothing() {
    let bench = Bench::new();
    let config = bench.write_config("broken", &["-device", "no-such-device"]);
    bench.host.define(&config, LockWait::Fail).unwrap();
    let (lock, domain) = bench.host.lock("broken", LockWait::Fail).unwrap();
    let err = domain
        .start(bench.host.store(), &lock, LaunchOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Qemu);
    let text = err.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains("no-such-device"),
        "QEMU's stderr is shown: {text}"
    );
    for file in [
        &domain.paths().pid_file,
        &domain.paths().qmp_socket,
        &domain.paths().query_socket,
    ] {
        assert!(!file.exists(), "{} left behind", file.display());
    }
    assert_eq!(domain.state().await.unwrap(), DomainState::ShutOff);

    // A disk image that vanished after define is refused before QEMU runs.
    fs::remove_file(bench.path("vdb.raw")).unwrap();
    let err = domain
        .start(bench.host.store(), &lock, LaunchOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("vdb.raw"), "{err}");
    drop(lock);
    // The domain stays loadable and can be undefined although an image is gone.
    assert_eq!(
        bench.host.domain("broken").unwrap().state().await.unwrap(),
        DomainState::ShutOff
    );
    bench
        .host
        .undefine("broken", LockWait::Fail, false)
        .unwrap();
}

#[tokio::test]
async fn busy_domain_is_refused_then_waited_for() {
    let bench = Bench::new();
    let config = bench.write_config("busy", &[]);
    bench.host.define(&config, LockWait::Fail).unwrap();
    let (lock, _) = bench.host.lock("busy", LockWait::Fail).unwrap();
    let err = bench.host.lock("busy", LockWait::Fail).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    let err = bench
        .host
        .undefine("busy", LockWait::Fail, false)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);

    let state_dir = bench.host.state_dir().root().to_path_buf();
    let waiter = std::thread::spawn(move || {
        let host = Host::open(Some(&state_dir)).unwrap();
        let started = Instant::now();
        host.undefine("busy", LockWait::Wait, false).unwrap();
        started.elapsed()
    });
    std::thread::sleep(Duration::from_millis(500));
    drop(lock);
    let waited = waiter.join().unwrap();
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    assert_eq!(
        bench.host.domain("busy").unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn bad_config_is_rejected_with_key_and_line() {
    let bench = Bench::new();
    let config = bench.write_config("bad", &[]);
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("vcpus = 1", "vcpus = 1\nmemroy = 5");
    fs::write(&config, text).unwrap();
    let err = bench.host.define(&config, LockWait::Fail).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(
        err.to_string().contains("line 4: unknown key `memroy`"),
        "{err}"
    );
    assert!(bench.host.domains().unwrap().is_empty());
    assert!(!bench.host.state_dir().domain_paths("bad").dir.exists());
}
