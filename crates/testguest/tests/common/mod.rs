//! Shared helpers of the test guest's integration tests: a tiny blocking QMP
//! client (the real one is async and lives in vmsnap-qmp) and image helpers.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A blocking, line-based QMP connection that skips events.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation.
    pub fn connect(path: &Path) -> Qmp {
        let stream = UnixStream::connect(path).expect("connect QMP socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = qmp.read_message();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).expect("QMP message is JSON")
    }

    /// Runs a command and returns its `return` value; panics on a QMP error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        match self.try_execute(command, arguments) {
            Ok(value) => value,
            Err(error) => panic!("QMP {command} failed: {error}"),
        }
    }

    /// Runs a command; `Err` carries QEMU's error object.
    pub fn try_execute(&mut self, command: &str, arguments: Value) -> Result<Value, Value> {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}").expect("write QMP");
        loop {
            let message = self.read_message();
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(error.clone());
            }
        }
    }

    /// Polls `query-migrate` until the migration is completed; panics if it
    /// fails or takes longer than `timeout`.
    pub fn wait_migration_completed(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", json!({}));
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return,
                Some("failed") | Some("cancelled") => panic!("migration ended: {info}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "migration not completed: {info}");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Creates an image with qemu-img.
pub fn create_image(path: &Path, format: &str, size: &str) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size));
}

/// The whole guest-visible content of an image, read on the host by
/// `qemu-img convert -O raw` (QEMU's own reading of the file).
pub fn image_contents(image: &Path, format: &str) -> Vec<u8> {
    let raw = image.with_extension("converted.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(&raw));
    let bytes = std::fs::read(&raw).expect("read converted image");
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// Runs `qemu-img check` and panics unless the image is clean.
pub fn check_image_clean(image: &Path) {
    run(Command::new("qemu-img").args(["check", "-q"]).arg(image));
}

fn run(command: &mut Command) {
    let output = command.output().expect("spawn");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
