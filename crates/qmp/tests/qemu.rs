//! The QMP client against a real qemu-system-x86_64 (7.2 on the CI machines).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmsnap_qmp::{Error, ErrorKind, JobStatus, MigrationStatus, Qmp, RunState};

const CONNECT: Duration = Duration::from_secs(20);
const MIB: u64 = 1024 * 1024;

/// A QEMU process with its QMP socket in a private temp dir; killed on drop.
struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Qemu {
    /// A QEMU without a machine: starts fast and runs under KVM or TCG alike.
    fn bare(extra: &[&str]) -> Qemu {
        let mut args = vec!["-machine", "none"];
        args.extend_from_slice(extra);
        Qemu::spawn_in(tempfile::tempdir().unwrap(), &args)
    }

    /// A paused (`-S`) TCG pc machine with a qcow2 disk node `d0` on file
    /// node `f0`, for snapshot jobs and migration.
    fn pc_with_qcow2(extra: &[&str]) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("16M")
            .status()
            .unwrap();
        assert!(status.success(), "qemu-img create failed");
        let file_node = format!("driver=file,filename={},node-name=f0", image.display());
        let mut args = vec![
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "64",
            "-S",
            "-blockdev",
            &file_node,
            "-blockdev",
            "driver=qcow2,file=f0,node-name=d0",
        ];
        args.extend_from_slice(extra);
        Qemu::spawn_in(dir, &args)
    }

    fn spawn_in(dir: tempfile::TempDir, args: &[&str]) -> Qemu {
        let socket = dir.path().join("qmp.sock");
        let child = Qemu::command(&socket, dir.path(), args).spawn().unwrap();
        Qemu { child, dir, socket }
    }

    fn command(socket: &Path, dir: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-nodefaults", "-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log")).unwrap());
        command
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    async fn connect(&self) -> Qmp {
        match Qmp::connect(&self.socket, CONNECT).await {
            Ok(qmp) => qmp,
            Err(e) => panic!("{e}; QEMU stderr: {}", self.stderr()),
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_qmp_error(result: Result<impl std::fmt::Debug, Error>, class: &str, desc_part: &str) {
    match result {
        Err(Error::Qmp {
            class: got_class,
            desc,
            ..
        }) => {
            assert_eq!(got_class, class, "desc: {desc}");
            assert!(desc.contains(desc_part), "{desc:?} lacks {desc_part:?}");
        }
        other => panic!("expected QMP error {class}, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_waits_for_a_starting_qemu_and_reports_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qmp.sock");
    let connecting = {
        let socket = socket.clone();
        tokio::spawn(async move { Qmp::connect(&socket, CONNECT).await })
    };
    // The client is already retrying before QEMU even exists.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!connecting.is_finished());
    let child = Qemu::command(&socket, dir.path(), &["-machine", "none"])
        .spawn()
        .unwrap();
    let qemu = Qemu { child, dir, socket };
    let qmp = connecting
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}: {}", qemu.stderr()));

    let version = qmp.query_version().await.unwrap();
    assert_eq!(&version, &qmp.greeting().version);
    assert_eq!(
        (version.major, version.minor),
        (7, 2),
        "tests expect QEMU 7.2"
    );
    assert!(version.at_least(7, 2) && version.at_least(6, 0) && !version.at_least(8, 2));
    assert!(qmp.greeting().capabilities.iter().any(|c| c == "oob"));
    assert_eq!(qmp.path(), qemu.socket);
    assert!(qmp.is_connected());
}

#[tokio::test]
async fn connect_to_a_missing_socket_times_out_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody-listens.sock");
    let start = Instant::now();
    let err = Qmp::connect(&socket, Duration::from_millis(300))
        .await
        .unwrap_err();
    let elapsed = start.elapsed();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert!(err.to_string().contains("nobody-listens.sock"), "{err}");
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test]
async fn concurrent_commands_get_their_own_replies() {
    let objects: Vec<String> = (1..=8)
        .map(|k| format!("memory-backend-ram,id=m{k},size={k}M"))
        .collect();
    let mut args = Vec::new();
    for object in &objects {
        args.extend(["-object", object.as_str()]);
    }
    let qemu = Qemu::bare(&args);
    let qmp = qemu.connect().await;

    let mut set = tokio::task::JoinSet::new();
    for i in 0..40u64 {
        let qmp = qmp.clone();
        set.spawn(async move {
            let k = i % 8 + 1;
            let path = if i % 5 == 4 {
                format!("/objects/missing{i}")
            } else {
                format!("/objects/m{k}")
            };
            let result = qmp
                .execute("qom-get", Some(json!({"path": path, "property": "size"})))
                .await;
            (i, k, result)
        });
    }
    let mut seen = 0;
    while let Some(joined) = set.join_next().await {
        let (i, k, result) = joined.unwrap();
        if i % 5 == 4 {
            assert_qmp_error(result, "DeviceNotFound", &format!("missing{i}"));
        } else {
            assert_eq!(result.unwrap(), json!(k * MIB), "command {i}");
        }
        seen += 1;
    }
    assert_eq!(seen, 40);
    assert_eq!(qmp.stats().stray_replies, 0);
    assert_eq!(qmp.stats().unexpected_messages, 0);
}

#[tokio::test]
async fn rejected_commands_are_typed_qmp_errors() {
    let qemu = Qemu::bare(&[]);
    let qmp = qemu.connect().await;

    let err = qmp.execute("no-such-command", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Qmp);
    assert_eq!(err.qmp_class(), Some("CommandNotFound"));
    let message = err.to_string();
    assert!(message.contains("no-such-command"), "{message}");
    assert!(message.contains("qmp.sock"), "{message}");

    let missing = qemu.dir.path().join("does-not-exist.img");
    assert_qmp_error(
        qmp.execute(
            "blockdev-add",
            Some(json!({"driver": "file", "node-name": "x", "filename": missing})),
        )
        .await,
        "GenericError",
        "No such file or directory",
    );
    assert_qmp_error(
        qmp.execute("query-status", Some(json!({"bogus": 1}))).await,
        "GenericError",
        "bogus",
    );
    // The connection is still fine after refusals.
    assert!(qmp.query_status().await.unwrap().running);
}

#[tokio::test]
async fn stop_and_cont_emit_events_to_subscribers() {
    let qemu = Qemu::bare(&[]);
    let qmp = qemu.connect().await;
    let mut events = qmp.events();
    let mut second = qmp.events();
    let wait = Duration::from_secs(5);

    qmp.stop().await.unwrap();
    let stop = qmp
        .wait_event(&mut events, "STOP", |_| true, wait)
        .await
        .unwrap();
    assert!(stop.timestamp.seconds > 1_600_000_000, "{stop:?}");
    let status = qmp.query_status().await.unwrap();
    assert_eq!(status.status, RunState::Paused);
    assert!(!status.running);

    qmp.cont().await.unwrap();
    qmp.wait_event(&mut events, "RESUME", |_| true, wait)
        .await
        .unwrap();
    assert_eq!(qmp.query_status().await.unwrap().status, RunState::Running);

    // Every subscriber gets every event, in order.
    assert_eq!(second.recv().await.unwrap().name, "STOP");
    assert_eq!(second.recv().await.unwrap().name, "RESUME");
    assert!(second.try_recv().is_none());

    let start = Instant::now();
    let err = qmp
        .wait_event(
            &mut events,
            "NEVER_SENT",
            |_| true,
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn blockdev_create_jobs_conclude_with_result_or_error() {
    let qemu = Qemu::bare(&[]);
    let qmp = qemu.connect().await;
    let image = qemu.dir.path().join("new.qcow2");
    fs::File::create(&image).unwrap();
    qmp.execute(
        "blockdev-add",
        Some(json!({"driver": "file", "node-name": "f0", "filename": image})),
    )
    .await
    .unwrap();

    qmp.execute(
        "blockdev-create",
        Some(json!({"job-id": "c1",
            "options": {"driver": "qcow2", "file": "f0", "size": 3 * MIB}})),
    )
    .await
    .unwrap();
    // Wait only after the job has surely concluded: the transition must not be missed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    qmp.wait_job("c1", Duration::from_secs(10)).await.unwrap();
    let header = fs::read(&image).unwrap();
    assert_eq!(&header[..4], b"QFI\xfb");
    assert_eq!(
        u64::from_be_bytes(header[24..32].try_into().unwrap()),
        3 * MIB
    );
    assert!(
        qmp.query_jobs().await.unwrap().is_empty(),
        "wait_job dismisses the job"
    );

    qmp.execute(
        "blockdev-create",
        Some(json!({"job-id": "c2",
            "options": {"driver": "qcow2", "file": "f0", "size": MIB, "cluster-size": 1000}})),
    )
    .await
    .unwrap();
    match qmp.wait_job("c2", Duration::from_secs(10)).await {
        Err(Error::Job { job_id, error, .. }) => {
            assert_eq!(job_id, "c2");
            assert!(error.contains("luster size"), "{error}");
        }
        other => panic!("expected a job error, got {other:?}"),
    }
    assert!(qmp.query_jobs().await.unwrap().is_empty());

    let err = qmp
        .wait_job("never-created", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::JobNotFound);

    let nodes = qmp.query_named_block_nodes().await.unwrap();
    assert!(nodes.iter().any(|n| n.node_name == "f0" && n.drv == "file"));
}

#[tokio::test]
async fn blockstats_and_query_block_see_the_firmware_reading_the_disk() {
    let qemu = Qemu::pc_with_qcow2(&["-device", "ide-hd,drive=d0,id=disk0"]);
    let qmp = qemu.connect().await;
    qmp.cont().await.unwrap();

    let blocks = qmp.query_block().await.unwrap();
    let disk = blocks
        .iter()
        .find(|b| b.inserted.as_ref().is_some_and(|i| i.node_name == "d0"))
        .expect("d0 in query-block");
    assert!(
        disk.qdev.as_deref().unwrap_or_default().contains("disk0"),
        "{disk:?}"
    );
    let inserted = disk.inserted.as_ref().unwrap();
    assert_eq!(inserted.drv, "qcow2");
    assert_eq!(inserted.image.as_ref().unwrap().virtual_size, 16 * MIB);

    // SeaBIOS reads the boot sector through the IDE device within seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stats = loop {
        let all = qmp.query_blockstats(false).await.unwrap();
        let stats = all
            .into_iter()
            .find(|s| s.node_name.as_deref() == Some("d0"))
            .expect("d0 in query-blockstats");
        if stats.stats.rd_operations > 0 || Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(stats.stats.rd_operations > 0, "{stats:?}");
    assert!(
        stats.stats.rd_bytes >= 512 * stats.stats.rd_operations,
        "{stats:?}"
    );
    assert!(stats.stats.rd_total_time_ns > 0, "{stats:?}");
    assert_eq!(stats.stats.wr_operations, 0);
    let parent = stats.parent.expect("file node statistics");
    assert_eq!(parent.node_name.as_deref(), Some("f0"));
}

#[tokio::test]
async fn snapshot_jobs_save_list_fail_and_delete() {
    let qemu = Qemu::pc_with_qcow2(&[]);
    let qmp = qemu.connect().await;
    let wait = Duration::from_secs(20);
    let mut events = qmp.events();

    qmp.execute(
        "snapshot-save",
        Some(json!({"job-id": "s1", "tag": "first", "vmstate": "d0", "devices": ["d0"]})),
    )
    .await
    .unwrap();
    qmp.wait_job("s1", wait).await.unwrap();
    let mut statuses = Vec::new();
    while let Some(Ok(event)) = events.try_recv() {
        if event.name == "JOB_STATUS_CHANGE" && event.data_str("id") == Some("s1") {
            statuses.push(JobStatus::from_qapi(event.data_str("status").unwrap()));
        }
    }
    assert!(statuses.contains(&JobStatus::Concluded), "{statuses:?}");

    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let d0 = nodes.iter().find(|n| n.node_name == "d0").expect("node d0");
    let snapshots = d0
        .image
        .as_ref()
        .unwrap()
        .snapshots
        .clone()
        .unwrap_or_default();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    assert_eq!(snapshots[0].name, "first");
    assert!(snapshots[0].vm_state_size > 0);

    qmp.execute(
        "snapshot-load",
        Some(json!({"job-id": "l1", "tag": "no-such-tag", "vmstate": "d0", "devices": ["d0"]})),
    )
    .await
    .unwrap();
    let err = qmp.wait_job("l1", wait).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Job);
    assert!(err.to_string().contains("no-such-tag"), "{err}");

    qmp.execute(
        "snapshot-delete",
        Some(json!({"job-id": "d1", "tag": "first", "devices": ["d0"]})),
    )
    .await
    .unwrap();
    qmp.wait_job("d1", wait).await.unwrap();
    let blocks = qmp.query_named_block_nodes().await.unwrap();
    let d0 = blocks.iter().find(|n| n.node_name == "d0").unwrap();
    assert!(d0
        .image
        .as_ref()
        .unwrap()
        .snapshots
        .as_deref()
        .unwrap_or_default()
        .is_empty());
}

#[tokio::test]
async fn migration_to_a_file_completes_and_a_broken_one_fails() {
    let qemu = Qemu::pc_with_qcow2(&[]);
    let qmp = qemu.connect().await;
    let wait = Duration::from_secs(30);

    qmp.migrate("exec:exit 0").await.unwrap();
    match qmp.wait_migration(wait).await {
        Err(Error::Migration { status, .. }) => assert_eq!(status, MigrationStatus::Failed),
        other => panic!("expected a failed migration, got {other:?}"),
    }

    let state = qemu.dir.path().join("memory.state");
    let uri = format!("exec:cat > {}", state.display());
    qmp.migrate(&uri).await.unwrap();
    let info = qmp.wait_migration(wait).await.unwrap();
    assert_eq!(info.status, Some(MigrationStatus::Completed));
    assert!(info.total_time.is_some(), "{info:?}");
    assert!(info.downtime.is_some(), "{info:?}");
    let ram = info.ram.expect("ram stats");
    assert!(ram.total >= 64 * MIB, "{ram:?}");
    assert!(ram.transferred > 0);
    // `cat` may still be flushing when QEMU reports completion.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        let stream = fs::read(&state).unwrap_or_default();
        if stream.len() as u64 >= ram.transferred || Instant::now() > deadline {
            break stream;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(&stream[..4], b"QEVM", "migration stream magic");
    assert_eq!(
        qmp.query_status().await.unwrap().status,
        RunState::PostMigrate
    );

    // The revert path: a fresh QEMU loads the saved state.
    let target = Qemu::pc_with_qcow2(&["-incoming", "defer"]);
    let incoming = target.connect().await;
    assert_eq!(
        incoming.query_status().await.unwrap().status,
        RunState::InMigrate
    );
    incoming
        .migrate_incoming(&format!("exec:cat {}", state.display()))
        .await
        .unwrap();
    let info = incoming.wait_migration(wait).await.unwrap();
    assert_eq!(info.status, Some(MigrationStatus::Completed));
    incoming.cont().await.unwrap();
    assert_eq!(
        incoming.query_status().await.unwrap().status,
        RunState::Running
    );
}

#[tokio::test]
async fn sigkilled_qemu_fails_pending_and_later_commands_promptly() {
    let qemu = Qemu::bare(&[]);
    let qmp = qemu.connect().await;
    let mut events = qmp.events();

    // A stopped QEMU cannot answer: the command stays pending.
    qemu.signal(libc::SIGSTOP);
    let pending = {
        let qmp = qmp.clone();
        tokio::spawn(async move { qmp.execute("query-status", None).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished());
    let killed_at = Instant::now();
    qemu.signal(libc::SIGKILL);

    let err = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("pending command hung after SIGKILL")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Disconnected);
    assert!(err.to_string().contains("qmp.sock"), "{err}");
    assert!(killed_at.elapsed() < Duration::from_secs(2));

    tokio::time::timeout(Duration::from_secs(1), qmp.disconnected())
        .await
        .unwrap();
    assert!(!qmp.is_connected());
    let start = Instant::now();
    let err = qmp.execute("query-status", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Disconnected);
    assert!(start.elapsed() < Duration::from_millis(500));
    assert_eq!(
        events.recv().await.unwrap_err().kind(),
        ErrorKind::Disconnected
    );
    assert_eq!(
        qmp.events().recv().await.unwrap_err().kind(),
        ErrorKind::Disconnected
    );
}

#[tokio::test]
async fn a_slow_reply_times_out_and_is_later_counted_as_stray() {
    let qemu = Qemu::bare(&[]);
    let qmp = qemu.connect().await;

    qemu.signal(libc::SIGSTOP);
    let start = Instant::now();
    let err = qmp
        .execute_timeout("query-status", None, Duration::from_millis(300))
        .await
        .unwrap_err();
    let elapsed = start.elapsed();
    qemu.signal(libc::SIGCONT);
    match &err {
        Error::Timeout { command, .. } => assert_eq!(command, "query-status"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(elapsed >= Duration::from_millis(290), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");

    // QEMU answers in order, so the late reply arrives before this one's.
    assert!(qmp.query_status().await.unwrap().running);
    assert_eq!(qmp.stats().stray_replies, 1);
    assert!(qmp.last_stray_reply().unwrap()["return"]["running"]
        .as_bool()
        .unwrap());

    let short = qmp.clone().with_default_timeout(Duration::from_millis(200));
    qemu.signal(libc::SIGSTOP);
    let err = short.stop().await.unwrap_err();
    qemu.signal(libc::SIGCONT);
    assert_eq!(err.kind(), ErrorKind::Timeout);
}

#[tokio::test]
async fn close_ends_every_clone_but_leaves_qemu_running() {
    let qemu = Qemu::bare(&[]);
    let qmp = qemu.connect().await;
    let clone = qmp.clone();
    qmp.close().await;
    let err = clone.query_status().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Disconnected);

    // QEMU serves a new client once the old one is gone.
    let again = qemu.connect().await;
    assert!(again.query_status().await.unwrap().running);
    again.quit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), again.disconnected())
        .await
        .expect("quit closes the connection");
}

#[tokio::test]
async fn background_snapshot_migration_of_a_running_guest_completes() {
    let qemu = Qemu::pc_with_qcow2(&[]);
    let qmp = qemu.connect().await;
    qmp.cont().await.unwrap();
    qmp.migrate_set_capabilities(&[("background-snapshot", true)])
        .await
        .unwrap();
    let state = qemu.dir.path().join("memory.state");
    let mut events = qmp.events();
    qmp.migrate(&format!("exec:cat > {}", state.display()))
        .await
        .unwrap();
    let info = qmp.wait_migration(Duration::from_secs(30)).await.unwrap();
    assert_eq!(info.status, Some(MigrationStatus::Completed));
    assert!(info.ram.expect("ram stats").total >= 64 * MIB);
    // The guest was paused only briefly and runs again afterwards.
    let mut names = Vec::new();
    while let Some(Ok(event)) = events.try_recv() {
        names.push(event.name);
    }
    assert!(names.contains(&"STOP".to_string()), "{names:?}");
    assert!(names.contains(&"RESUME".to_string()), "{names:?}");
    assert_eq!(qmp.query_status().await.unwrap().status, RunState::Running);
}

#[tokio::test]
async fn a_second_client_gets_no_greeting_and_times_out_with_a_hint() {
    let qemu = Qemu::bare(&[]);
    let first = qemu.connect().await;
    let err = Qmp::connect(&qemu.socket, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.to_string().contains("another client"), "{err}");
    assert!(first.query_status().await.unwrap().running);
}

#[test]
fn client_futures_can_be_spawned_on_a_multi_threaded_runtime() {
    fn assert_send<T: Send>(_: T) {}
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let qemu = Qemu::bare(&[]);
    let qmp = runtime.block_on(qemu.connect());
    let mut events = qmp.events();
    assert_send(qmp.execute("query-status", None));
    assert_send(qmp.wait_job("j", Duration::from_secs(1)));
    assert_send(qmp.wait_migration(Duration::from_secs(1)));
    assert_send(qmp.wait_event(&mut events, "STOP", |_| true, Duration::from_secs(1)));
    assert_send(qmp.clone().close());
    let status = runtime
        .block_on(runtime.spawn({
            let qmp = qmp.clone();
            async move { qmp.query_status().await }
        }))
        .unwrap()
        .unwrap();
    assert!(status.running);
}

#[tokio::test]
async fn a_lagging_subscriber_is_told_how_many_events_it_lost() {
    let qemu = Qemu::bare(&[]);
    let qmp = qemu.connect().await;
    let mut lagging = qmp.events();
    let mut live = qmp.events();
    let rounds = 2100;
    for _ in 0..rounds {
        qmp.stop().await.unwrap();
        qmp.cont().await.unwrap();
        // Keep this receiver current; only `lagging` falls behind.
        while let Some(event) = live.try_recv() {
            event.unwrap();
        }
    }
    let sent = 2 * rounds as u64;
    match lagging.recv().await {
        Err(Error::EventsLost { missed, .. }) => assert_eq!(missed, sent - 4096),
        other => panic!("expected lost events, got {other:?}"),
    }
    // After the report the receiver goes on with the oldest events it still has.
    let next = lagging.recv().await.unwrap();
    assert_eq!(
        next.name,
        if (sent - 4096) % 2 == 0 {
            "STOP"
        } else {
            "RESUME"
        }
    );
    assert_eq!(qmp.stats().unexpected_messages, 0);
}
