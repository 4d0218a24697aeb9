//! The domain commands end to end: the `vmsnap` binary against real
//! qemu-system-x86_64 7.2 and the test guest (TCG), judged by virsh's output
//! formats, exit codes and the guest's own view of its disks.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmsnap_core::{DomainLock, StateDir};
use vmsnap_testguest::lab::{self, DiskDef, VmsnapCli};
use vmsnap_testguest::Guest;

/// The vmsnap binary in a fresh directory (`lab::VmsnapCli`), with the checks
/// and the domain config of this file's tests.
struct Cli(VmsnapCli);

impl std::ops::Deref for Cli {
    type Target = VmsnapCli;

    fn deref(&self) -> &VmsnapCli {
        &self.0
    }
}

impl Cli {
    fn new() -> Cli {
        let cli = VmsnapCli::in_temp_dir(env!("CARGO_BIN_EXE_vmsnap"), "vmsnap-cli");
        // Never leave a QEMU behind, whatever the test did.
        cli.guard("clidom");
        Cli(cli)
    }

    /// Runs a command that must fail with exit code 1 and a one-line error; returns it.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(1), "vmsnap {args:?} should fail");
        lab::refusal(args, &out)
    }

    /// Creates vda.qcow2 and a config for the test guest with 256 MiB booting from it.
    fn write_config(&self, name: &str) -> PathBuf {
        lab::create_qcow2(&self.path("vda.qcow2"), "64M");
        self.write_guest_config(name, 256, &[DiskDef::qcow2("vda", "vda.qcow2")])
    }

    fn pid_file(&self, name: &str) -> PathBuf {
        self.state().join("domains").join(name).join("qemu.pid")
    }

    fn wait_for_state(&self, name: &str, state: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let list = self.ok(&["list", "--all"]);
            if row_of(&list, name).is_some_and(|row| row.ends_with(state)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never became {state}: {list}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn row_of<'a>(list: &'a str, name: &str) -> Option<&'a str> {
    list.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .map(str::trim_end)
}

fn stat(output: &str, field: &str) -> u64 {
    output
        .lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some("vda") && parts.next() == Some(field))
                .then(|| parts.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {field} in {output}"))
}

#[test]
fn domain_commands_round_trip() {
    let cli = Cli::new();
    let config = cli.write_config("clidom");
    let config_arg = config.to_str().unwrap();

    assert_eq!(
        cli.ok(&["define", config_arg]),
        format!("Domain 'clidom' defined from {config_arg}\n\n")
    );
    assert_eq!(
        cli.fails(&["define", config_arg]),
        "error: domain 'clidom' is already defined: undefine it first or pick another name"
    );
    assert_eq!(
        cli.ok(&["list"]),
        " Id   Name   State\n--------------------\n\n"
    );
    assert_eq!(
        cli.ok(&["list", "--all"]),
        " Id   Name     State\n-------------------------\n -    clidom   shut off\n\n"
    );
    assert!(cli
        .ok(&["dominfo", "clidom"])
        .contains("\nState:          shut off\n"));
    assert_eq!(
        cli.ok(&["domblklist", "clidom"]),
        format!(
            " Target   Source\n{}\n vda      {}\n\n",
            "-".repeat(
                9 + fs::canonicalize(cli.path("vda.qcow2"))
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .len()
                    + 3
            ),
            fs::canonicalize(cli.path("vda.qcow2")).unwrap().display()
        )
    );
    assert_eq!(
        cli.fails(&["suspend", "clidom"]),
        "error: cannot suspend domain 'clidom': it is shut off; start it with `vmsnap start clidom`"
    );

    assert_eq!(cli.ok(&["start", "clidom"]), "Domain 'clidom' started\n\n");
    assert_eq!(
        cli.fails(&["start", "clidom"]),
        "error: cannot start domain 'clidom': it is already running"
    );
    let list = cli.ok(&["list"]);
    let row = row_of(&list, "clidom").unwrap();
    let id: u32 = row.split_whitespace().next().unwrap().parse().unwrap();
    assert!(row.ends_with("clidom   running"), "{list}");
    let info = cli.ok(&["dominfo", "clidom"]);
    for expected in [
        format!("Id:             {id}\n"),
        "Name:           clidom\n".to_string(),
        "OS Type:        hvm\n".to_string(),
        "State:          running\n".to_string(),
        "CPU(s):         1\n".to_string(),
        "Max memory:     262144 KiB\n".to_string(),
        "Used memory:    262144 KiB\n".to_string(),
    ] {
        assert!(info.contains(&expected), "{expected:?} not in {info}");
    }
    let listed: serde_json::Value = serde_json::from_str(&cli.ok(&["list", "--json"])).unwrap();
    assert_eq!(listed[0]["name"], "clidom");
    assert_eq!(listed[0]["state"], "running");
    assert_eq!(listed[0]["id"], id);

    // The guest writes 512 KiB to vda; QEMU's counters, as domblkstat shows them, grow.
    let mut guest = Guest::connect(cli.path("ctl.sock"), Duration::from_secs(90)).unwrap();
    let before = cli.ok(&["domblkstat", "clidom", "vda"]);
    assert_eq!(
        before
            .lines()
            .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
            .collect::<Vec<_>>(),
        [
            "rd_req",
            "rd_bytes",
            "wr_req",
            "wr_bytes",
            "flush_operations",
            "rd_total_times",
            "wr_total_times",
            "flush_total_times",
            ""
        ]
    );
    guest.write_pattern("vda", 4 << 20, 512 << 10, 42).unwrap();
    let after = cli.ok(&["domblkstat", "clidom", "vda"]);
    assert!(
        stat(&after, "wr_bytes") >= stat(&before, "wr_bytes") + (512 << 10),
        "{before}{after}"
    );
    assert!(stat(&after, "wr_req") > stat(&before, "wr_req"));
    // As in virsh, the image's path names the disk too.
    let by_path = cli.ok(&[
        "domblkstat",
        "clidom",
        cli.path("vda.qcow2").to_str().unwrap(),
    ]);
    assert!(
        stat(&by_path, "wr_bytes") >= stat(&after, "wr_bytes"),
        "{by_path}"
    );
    let summed = cli.ok(&["domblkstat", "clidom"]);
    assert!(
        summed.starts_with(" rd_req "),
        "virsh's no-device form: {summed}"
    );
    let as_json: serde_json::Value =
        serde_json::from_str(&cli.ok(&["domblkstat", "clidom", "--json"])).unwrap();
    assert!(as_json["wr_bytes"].as_u64().unwrap() >= stat(&after, "wr_bytes"));
    assert!(cli
        .fails(&["domblkstat", "clidom", "vdz"])
        .contains("has no disk 'vdz'"));

    // Raw QMP: a return value as JSON; a command QEMU rejects fails with its error class.
    let status: serde_json::Value =
        serde_json::from_str(&cli.ok(&["qmp", "clidom", "query-status"])).unwrap();
    assert_eq!(status["status"], "running");
    let err = cli.fails(&["qmp", "clidom", "bogus-command"]);
    assert!(
        err.contains("CommandNotFound") && err.contains("bogus-command"),
        "{err}"
    );
    let err = cli.fails(&["qmp", "clidom", "query-status", "[1]"]);
    assert!(err.contains("JSON object"), "{err}");

    // Another vmsnap holding the domain makes commands fail at once, or wait with --wait.
    let state = StateDir::open(Some(&cli.state())).unwrap();
    let lock = DomainLock::acquire(
        "clidom",
        &state.domain_paths("clidom"),
        vmsnap_core::LockWait::Fail,
    )
    .unwrap();
    let started = Instant::now();
    assert_eq!(
        cli.fails(&["suspend", "clidom"]),
        format!(
            "error: domain clidom is busy: another vmsnap command (pid {}) is working on it; retry or pass --wait",
            std::process::id()
        )
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "busy must fail at once"
    );
    assert!(
        cli.ok(&["list"]).contains("running"),
        "read-only commands need no lock"
    );
    let waiter = cli
        .command(&["--wait", "suspend", "clidom"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        cli.ok(&["list"]).contains("running"),
        "the waiter must not act before the lock is free"
    );
    drop(lock);
    let waited = waiter.wait_with_output().unwrap();
    assert!(waited.status.success());
    assert_eq!(
        String::from_utf8_lossy(&waited.stdout),
        "Domain 'clidom' suspended\n\n"
    );
    cli.wait_for_state("clidom", "paused", Duration::from_secs(5));
    assert_eq!(cli.ok(&["resume", "clidom"]), "Domain 'clidom' resumed\n\n");
    cli.wait_for_state("clidom", "running", Duration::from_secs(5));

    // ACPI shutdown: the guest powers off and QEMU exits cleanly.
    assert_eq!(
        cli.ok(&["shutdown", "clidom"]),
        "Domain 'clidom' is being shutdown\n\n"
    );
    cli.wait_for_state("clidom", "shut off", Duration::from_secs(60));
    assert!(!cli.pid_file("clidom").exists());

    // SIGKILL: list reports it crashed at once instead of hanging, and tidies up.
    cli.ok(&["start", "--paused", "clidom"]);
    cli.wait_for_state("clidom", "paused", Duration::from_secs(5));
    let pid = cli.qemu_pid("clidom").unwrap();
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let killed = Instant::now();
    cli.wait_for_state("clidom", "crashed", Duration::from_secs(10));
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert!(
        !cli.pid_file("clidom").exists(),
        "list removed the stale pid file"
    );
    assert_eq!(
        cli.ok(&["list"]),
        " Id   Name   State\n--------------------\n\n",
        "a crashed domain is inactive"
    );
    assert_eq!(
        cli.fails(&["destroy", "clidom"]),
        "error: cannot destroy domain 'clidom': it is crashed; start it with `vmsnap start clidom`"
    );

    // A start that QEMU refuses (another process holds the image's write
    // lock) changes nothing: the domain still shows crashed, no Id taken.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(cli.path("vda.qcow2"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let before = cli.ok(&["dominfo", "clidom"]);
    let err = cli.fails(&["start", "clidom"]);
    assert!(err.contains("lock"), "QEMU's own reason is shown: {err}");
    assert_eq!(cli.ok(&["dominfo", "clidom"]), before);
    assert!(row_of(&cli.ok(&["list", "--all"]), "clidom").is_some_and(|r| r.ends_with("crashed")));
    drop(holder.stdin.take());
    holder.wait().unwrap();

    // It starts again after the crash; destroy and undefine finish the round trip.
    cli.ok(&["start", "--paused", "clidom"]);
    assert_eq!(
        cli.ok(&["destroy", "clidom"]),
        "Domain 'clidom' destroyed\n\n"
    );
    cli.wait_for_state("clidom", "shut off", Duration::from_secs(5));
    assert_eq!(
        cli.ok(&["undefine", "clidom"]),
        "Domain 'clidom' has been undefined\n\n"
    );
    assert_eq!(
        cli.ok(&["list", "--all"]),
        " Id   Name   State\n--------------------\n\n"
    );
    assert_eq!(
        cli.fails(&["dominfo", "clidom"]),
        "error: domain 'clidom' not found: run `vmsnap list --all` to see the defined domains"
    );
    assert!(cli.path("vda.qcow2").exists());
}

#[test]
fn bad_configs_are_rejected_with_key_and_line() {
    let cli = Cli::new();
    let config = cli.write_config("clidom");
    let good = fs::read_to_string(&config).unwrap();
    let cases = [
        (
            good.replace("vcpus = 1", "vcpus = \"one\""),
            "line 3: key `vcpus`",
        ),
        (
            good.replace("vcpus = 1\n", "vcpus = 1\ncpus = 2\n"),
            "line 4: unknown key `cpus`",
        ),
        (
            good.replace("memory_mib = 256\n", ""),
            "missing key `memory_mib`",
        ),
        (
            good.replace("format = \"qcow2\"", "format = \"vmdk\""),
            "line 13: key `format`",
        ),
        (good.replace("vda.qcow2", "missing.qcow2"), "missing.qcow2"),
        (
            good.replace("name = \"clidom\"", "name = \"../x\""),
            "line 1: key `name`",
        ),
    ];
    for (text, expected) in cases {
        let path = cli.path("bad.toml");
        fs::write(&path, &text).unwrap();
        let err = cli.fails(&["define", path.to_str().unwrap()]);
        assert!(err.contains("bad.toml"), "{err}");
        assert!(err.contains(expected), "{expected:?} not in {err}");
    }
    assert_eq!(
        cli.ok(&["list", "--all"]),
        " Id   Name   State\n--------------------\n\n"
    );
}

#[test]
fn vmsnap_killed_mid_command_leaves_the_domain_usable() {
    let cli = Cli::new();
    let config = cli.write_config("clidom");
    let config_arg = config.to_str().unwrap();
    let killed = |args: &[&str], point: &str| {
        let out = cli
            .command(args)
            .env("VMSNAP_FAILPOINTS", point)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), None, "{args:?} should die at {point}");
    };

    killed(&["define", config_arg], "domain.define.locked");
    assert_eq!(
        cli.ok(&["list", "--all"]),
        " Id   Name   State\n--------------------\n\n"
    );
    cli.ok(&["define", config_arg]);

    killed(&["start", "--paused", "clidom"], "domain.start.spawned");
    cli.wait_for_state("clidom", "paused", Duration::from_secs(5));
    let list = cli.ok(&["list"]);
    let id = row_of(&list, "clidom")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        id.parse::<u32>().is_ok(),
        "a running domain has an Id: {list}"
    );
    assert_eq!(
        cli.fails(&["start", "clidom"]),
        "error: cannot start domain 'clidom': it is already paused"
    );

    killed(&["destroy", "clidom"], "domain.destroy.signalled");
    cli.wait_for_state("clidom", "shut off", Duration::from_secs(10));
    cli.ok(&["start", "--paused", "clidom"]);
    cli.ok(&["destroy", "clidom"]);

    killed(&["undefine", "clidom"], "domain.undefine.forgotten");
    assert_eq!(
        cli.ok(&["list", "--all"]),
        " Id   Name   State\n--------------------\n\n"
    );
    assert_eq!(
        cli.ok(&["define", config_arg]),
        format!("Domain 'clidom' defined from {config_arg}\n\n")
    );
}

#[test]
fn help_describes_vmsnap_not_one_command_group() {
    for flag in ["-h", "--help"] {
        let out = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
            .arg(flag)
            .output()
            .unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            help.starts_with("VM snapshots for QEMU/KVM\n\nUsage: vmsnap"),
            "{flag}:\n{help}"
        );
    }
}
