//! The connection: one background reader task demultiplexes replies (by id)
//! and events, one writer task sends whole command lines, and any number of
//! cheap [`Qmp`] handles issue commands concurrently.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

use crate::error::Error;
use crate::protocol::{
    classify, Decoded, Decoder, Event, Greeting, Message, QmpErrorBody, Version,
};
use crate::types::{
    BlockDeviceInfo, BlockInfo, BlockStats, JobInfo, JobStatus, MigrationInfo, MigrationStatus,
    StatusInfo,
};

/// How long a command may wait for its reply unless the caller says otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Events buffered per subscriber before the slowest one starts losing them.
const EVENT_CAPACITY: usize = 4096;

/// Pause between attempts while QEMU has not created its socket yet.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// How often job and migration waits re-check state when no event arrives
/// (events are the fast path; polling covers lost events and QEMU builds
/// that emit none, e.g. MIGRATION without the `events` capability).
const POLL_INTERVAL: Duration = Duration::from_millis(100);

type ReplySender = oneshot::Sender<Result<Value, QmpErrorBody>>;

/// Connection state shared between the handles and the reader/writer tasks.
struct Shared {
    path: PathBuf,
    state: Mutex<State>,
    stray_replies: AtomicU64,
    unexpected_messages: AtomicU64,
    closed: watch::Sender<bool>,
}

struct State {
    open: bool,
    pending: HashMap<u64, ReplySender>,
    events: Option<broadcast::Sender<Event>>,
    last_stray_reply: Option<Value>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every critical section is a single insert/remove), so a poisoned
        // lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection dead: pending commands fail with `Disconnected`
    /// (their reply senders are dropped), event receivers see the end.
    fn shut_down(&self) {
        {
            let mut state = self.lock();
            state.open = false;
            state.pending.clear();
            state.events = None;
        }
        self.closed.send_replace(true);
    }

    fn disconnected(&self) -> Error {
        Error::Disconnected {
            path: self.path.clone(),
        }
    }

    fn dispatch(&self, value: Value) {
        match classify(value.clone()) {
            Message::Reply { id, result } => {
                let sender = id
                    .as_ref()
                    .and_then(Value::as_u64)
                    .and_then(|id| self.lock().pending.remove(&id));
                match sender {
                    // The waiter may have given up (timeout, dropped future); that is fine.
                    Some(sender) => drop(sender.send(result)),
                    None => {
                        self.stray_replies.fetch_add(1, Ordering::Relaxed);
                        self.lock().last_stray_reply = Some(value);
                    }
                }
            }
            Message::Event(event) => {
                if let Some(events) = &self.lock().events {
                    // No subscribers is not an error: nobody wanted this event.
                    drop(events.send(event));
                }
            }
            Message::Greeting(_) | Message::Unknown(_) => {
                self.unexpected_messages.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Removes a pending command's entry when its waiter stops waiting, whatever
/// the reason (reply, timeout, or the caller dropping the future).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// Reads JSON values from the socket.
struct MessageReader {
    read: OwnedReadHalf,
    decoder: Decoder,
}

impl MessageReader {
    /// The next value, or `None` at end of stream. Garbage between values is
    /// counted in `unexpected` and skipped.
    async fn next_value(&mut self, unexpected: Option<&AtomicU64>) -> io::Result<Option<Value>> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match self.decoder.next() {
                Decoded::Value(value) => return Ok(Some(value)),
                Decoded::Garbage(_) => {
                    if let Some(counter) = unexpected {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Decoded::NeedMore => {
                    let n = self.read.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(None);
                    }
                    self.decoder.extend(&chunk[..n]);
                }
            }
        }
    }
}

/// Counters of odd traffic, so callers and tests can see what the client
/// ignored instead of it being printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Replies whose id matched no waiting command (e.g. late replies to
    /// commands that timed out, or replies without an id).
    pub stray_replies: u64,
    /// Messages that were neither a reply nor an event, or not JSON at all.
    pub unexpected_messages: u64,
}

/// A subscription to QMP events: every event QEMU sends after it was made.
pub struct EventReceiver {
    receiver: broadcast::Receiver<Event>,
    path: PathBuf,
}

impl EventReceiver {
    /// The next event. Fails with `EventsLost` (once, then continues with
    /// newer events) if this receiver fell more than 4096 events behind, and
    /// with `Disconnected` once the connection is gone and all events are read.
    pub async fn recv(&mut self) -> Result<Event, Error> {
        match self.receiver.recv().await {
            Ok(event) => Ok(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => Err(Error::EventsLost {
                path: self.path.clone(),
                missed,
            }),
            Err(broadcast::error::RecvError::Closed) => Err(Error::Disconnected {
                path: self.path.clone(),
            }),
        }
    }

    /// An already received event, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<Event, Error>> {
        match self.receiver.try_recv() {
            Ok(event) => Some(Ok(event)),
            Err(broadcast::error::TryRecvError::Empty) => None,
            Err(broadcast::error::TryRecvError::Lagged(missed)) => Some(Err(Error::EventsLost {
                path: self.path.clone(),
                missed,
            })),
            Err(broadcast::error::TryRecvError::Closed) => Some(Err(Error::Disconnected {
                path: self.path.clone(),
            })),
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    greeting: Greeting,
    outgoing: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|e| e.into_inner());
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

/// A QMP connection to one QEMU. Cloning is cheap and every clone shares the
/// connection, so supervision, snapshot code and event watchers can all use
/// it at once. The connection ends when the last clone is dropped, `close`
/// is called, or QEMU goes away.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
    default_timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.inner.shared.path)
            .field("version", &self.inner.greeting.version)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Qmp {
    /// Connects to QEMU's QMP socket, retrying while the socket does not
    /// exist or refuses connections (QEMU may still be starting), reads the
    /// greeting and enters command mode with `qmp_capabilities`. `timeout`
    /// bounds the whole handshake.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, Error> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() + CONNECT_RETRY < deadline =>
                {
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
                Err(source) => {
                    return Err(Error::Connect {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        };
        let (read, write) = stream.into_split();
        let mut reader = MessageReader {
            read,
            decoder: Decoder::default(),
        };
        let greeting = match timeout_at(deadline, reader.next_value(None)).await {
            Err(_) => {
                return Err(Error::Timeout {
                    path: path.to_owned(),
                    command: "QMP greeting (is another client connected to this socket?)"
                        .to_owned(),
                    timeout,
                })
            }
            Ok(Err(source)) => {
                return Err(Error::Io {
                    path: path.to_owned(),
                    source,
                })
            }
            Ok(Ok(None)) => {
                return Err(Error::Disconnected {
                    path: path.to_owned(),
                })
            }
            Ok(Ok(Some(value))) => match classify(value) {
                Message::Greeting(greeting) => greeting,
                other => {
                    return Err(Error::Protocol {
                        path: path.to_owned(),
                        detail: format!("expected the QMP greeting, got {other:?}"),
                    })
                }
            },
        };

        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            state: Mutex::new(State {
                open: true,
                pending: HashMap::new(),
                events: Some(events),
                last_stray_reply: None,
            }),
            stray_replies: AtomicU64::new(0),
            unexpected_messages: AtomicU64::new(0),
            closed: watch::Sender::new(false),
        });
        let (outgoing, to_write) = mpsc::unbounded_channel();
        let reader_task = tokio::spawn(read_loop(reader, Arc::clone(&shared)));
        let writer_task = tokio::spawn(write_loop(write, to_write, Arc::clone(&shared)));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                shared,
                greeting,
                outgoing,
                next_id: AtomicU64::new(1),
                tasks: Mutex::new(vec![reader_task, writer_task]),
            }),
            default_timeout: DEFAULT_COMMAND_TIMEOUT,
        };
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        qmp.execute_timeout("qmp_capabilities", None, remaining)
            .await?;
        Ok(qmp)
    }

    /// This handle with another timeout for `execute`/`execute_as` and the
    /// typed helpers (other clones keep theirs).
    pub fn with_default_timeout(mut self, timeout: Duration) -> Qmp {
        self.default_timeout = timeout;
        self
    }

    /// The QMP socket path, for messages.
    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    /// QEMU's version and capabilities as announced in the greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// Whether the connection is still up (QEMU has not gone away and
    /// `close` was not called).
    pub fn is_connected(&self) -> bool {
        self.inner.shared.lock().open
    }

    /// Resolves once the connection is gone, e.g. because QEMU exited; lets a
    /// supervisor notice a dead VM without polling.
    pub async fn disconnected(&self) {
        let mut closed = self.inner.shared.closed.subscribe();
        // The sender lives in `shared`, which we hold, so this cannot fail.
        let _ = closed.wait_for(|closed| *closed).await;
    }

    /// Counters of replies and messages the client ignored.
    pub fn stats(&self) -> ClientStats {
        let shared = &self.inner.shared;
        ClientStats {
            stray_replies: shared.stray_replies.load(Ordering::Relaxed),
            unexpected_messages: shared.unexpected_messages.load(Ordering::Relaxed),
        }
    }

    /// The most recent reply that matched no waiting command, for diagnosis.
    pub fn last_stray_reply(&self) -> Option<Value> {
        self.inner.shared.lock().last_stray_reply.clone()
    }

    /// Subscribes to every event QEMU sends from now on. Subscribe before
    /// issuing the command whose events you wait for, so none is missed.
    pub fn events(&self) -> EventReceiver {
        let receiver = match &self.inner.shared.lock().events {
            Some(sender) => sender.subscribe(),
            None => broadcast::channel(1).1,
        };
        EventReceiver {
            receiver,
            path: self.inner.shared.path.clone(),
        }
    }

    /// Runs a command with the default timeout and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, Error> {
        self.execute_timeout(command, arguments, self.default_timeout)
            .await
    }

    /// Runs a command, waiting at most `timeout` for its reply. Several calls
    /// may be in flight at once; each gets its own reply. A reply arriving
    /// after the timeout is counted in [`ClientStats::stray_replies`].
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let shared = &*self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments.filter(|a| !a.is_null()) {
            message["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&message).map_err(|source| Error::Json {
            path: shared.path.clone(),
            command: command.to_owned(),
            source,
        })?;
        line.push(b'\n');

        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut state = shared.lock();
            if !state.open {
                return Err(shared.disconnected());
            }
            state.pending.insert(id, reply_tx);
        }
        let _guard = PendingGuard { shared, id };
        if self.inner.outgoing.send(line).is_err() {
            return Err(shared.disconnected());
        }
        match tokio::time::timeout(timeout, reply_rx).await {
            Err(_) => Err(Error::Timeout {
                path: shared.path.clone(),
                command: command.to_owned(),
                timeout,
            }),
            Ok(Err(_)) => Err(shared.disconnected()),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(QmpErrorBody { class, desc }))) => Err(Error::Qmp {
                path: shared.path.clone(),
                command: command.to_owned(),
                class,
                desc,
            }),
        }
    }

    /// Runs a command with the default timeout and decodes its reply.
    pub async fn execute_as<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, Error> {
        let value = self.execute(command, arguments).await?;
        self.decode(command, value)
    }

    /// Runs a command with an explicit timeout and decodes its reply.
    pub async fn execute_as_timeout<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<T, Error> {
        let value = self.execute_timeout(command, arguments, timeout).await?;
        self.decode(command, value)
    }

    fn decode<T: DeserializeOwned>(&self, command: &str, value: Value) -> Result<T, Error> {
        serde_json::from_value(value).map_err(|source| Error::Json {
            path: self.inner.shared.path.clone(),
            command: command.to_owned(),
            source,
        })
    }

    /// Closes the connection for every clone: pending and later commands
    /// fail with `Disconnected`. QEMU keeps running.
    pub async fn close(self) {
        self.inner.shared.shut_down();
        let tasks: Vec<JoinHandle<()>> = {
            let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
            tasks.drain(..).collect()
        };
        for task in tasks {
            task.abort();
            // Cancelled or finished: either way the socket half it owned is dropped.
            let _ = task.await;
        }
    }

    /// Asks QEMU for its version (`query-version`).
    pub async fn query_version(&self) -> Result<Version, Error> {
        let info: crate::protocol::VersionInfo = self.execute_as("query-version", None).await?;
        Ok(info.into())
    }

    /// The VM run state (`query-status`).
    pub async fn query_status(&self) -> Result<StatusInfo, Error> {
        self.execute_as("query-status", None).await
    }

    /// Block devices with their inserted nodes (`query-block`).
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>, Error> {
        self.execute_as("query-block", None).await
    }

    /// I/O statistics per device, or per named node when `query_nodes`
    /// (`query-blockstats`). Devices created with `-blockdev` + `-device`
    /// have an empty `device` and are found by `node_name` or `qdev`.
    pub async fn query_blockstats(&self, query_nodes: bool) -> Result<Vec<BlockStats>, Error> {
        self.execute_as(
            "query-blockstats",
            Some(json!({ "query-nodes": query_nodes })),
        )
        .await
    }

    /// All block nodes with a name (`query-named-block-nodes`, flat on QEMU
    /// 7.0+ so backing chains are not repeated per node).
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockDeviceInfo>, Error> {
        let arguments = self
            .greeting()
            .version
            .at_least(7, 0)
            .then(|| json!({ "flat": true }));
        self.execute_as("query-named-block-nodes", arguments).await
    }

    /// Background jobs and their states (`query-jobs`).
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>, Error> {
        self.execute_as("query-jobs", None).await
    }

    /// State and statistics of the current or last migration (`query-migrate`).
    pub async fn query_migrate(&self) -> Result<MigrationInfo, Error> {
        self.execute_as("query-migrate", None).await
    }

    /// Pauses the guest (`stop`).
    pub async fn stop(&self) -> Result<(), Error> {
        self.execute("stop", None).await.map(drop)
    }

    /// Resumes the guest (`cont`).
    pub async fn cont(&self) -> Result<(), Error> {
        self.execute("cont", None).await.map(drop)
    }

    /// Makes QEMU exit at once without a guest shutdown (`quit`). The
    /// connection closing before the reply counts as success.
    pub async fn quit(&self) -> Result<(), Error> {
        match self.execute("quit", None).await {
            Ok(_) | Err(Error::Disconnected { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Asks the guest to power off via ACPI (`system_powerdown`); the guest
    /// may ignore it. Watch for the SHUTDOWN event or the process exit.
    pub async fn system_powerdown(&self) -> Result<(), Error> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// Turns migration capabilities on or off (`migrate-set-capabilities`),
    /// e.g. `[("background-snapshot", true)]`.
    pub async fn migrate_set_capabilities(
        &self,
        capabilities: &[(&str, bool)],
    ) -> Result<(), Error> {
        let list: Vec<Value> = capabilities
            .iter()
            .map(|(capability, state)| json!({ "capability": capability, "state": state }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .await
        .map(drop)
    }

    /// Starts an outgoing migration to `uri` (`migrate`), e.g.
    /// `exec:cat > FILE` on QEMU 7.2; finish with [`Qmp::wait_migration`].
    pub async fn migrate(&self, uri: &str) -> Result<(), Error> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// Loads VM state into a QEMU started with `-incoming defer`
    /// (`migrate-incoming`), e.g. from `exec:cat FILE`; finish with
    /// [`Qmp::wait_migration`], then `cont`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), Error> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// Cancels the current outgoing migration (`migrate_cancel`).
    pub async fn migrate_cancel(&self) -> Result<(), Error> {
        self.execute("migrate_cancel", None).await.map(drop)
    }

    /// Removes a concluded job (`job-dismiss`).
    pub async fn job_dismiss(&self, job_id: &str) -> Result<(), Error> {
        self.execute("job-dismiss", Some(json!({ "id": job_id })))
            .await
            .map(drop)
    }

    /// Cancels a job (`job-cancel`); wait for it with [`Qmp::wait_job`].
    pub async fn job_cancel(&self, job_id: &str) -> Result<(), Error> {
        self.execute("job-cancel", Some(json!({ "id": job_id })))
            .await
            .map(drop)
    }

    /// Waits on `events` for an event called `name` that satisfies
    /// `predicate`, skipping others. Subscribe before causing the event.
    pub async fn wait_event(
        &self,
        events: &mut EventReceiver,
        name: &str,
        predicate: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            match timeout_at(deadline, events.recv()).await {
                Err(_) => {
                    return Err(Error::Timeout {
                        path: self.path().to_owned(),
                        command: format!("waiting for event {name}"),
                        timeout,
                    })
                }
                Ok(Ok(event)) if event.name == name && predicate(&event) => return Ok(event),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// A command timeout for a step of a wait that must end by `deadline`.
    fn step_timeout(&self, deadline: Instant) -> Duration {
        self.default_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(500))
    }

    /// Waits until `events` delivers an event accepted by `relevant` (and
    /// returns it), the poll interval passes, or `deadline` is reached. Lost
    /// events just end the wait early, since the caller re-checks state.
    async fn nap(
        events: &mut EventReceiver,
        relevant: impl Fn(&Event) -> bool,
        deadline: Instant,
    ) -> Result<Option<Event>, Error> {
        let wake = (Instant::now() + POLL_INTERVAL).min(deadline);
        loop {
            match timeout_at(wake, events.recv()).await {
                Err(_) => return Ok(None),
                Ok(Ok(event)) if relevant(&event) => return Ok(Some(event)),
                Ok(Ok(_)) => {}
                Ok(Err(Error::EventsLost { .. })) => return Ok(None),
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Waits for the job `job_id` (snapshot-save/-load/-delete,
    /// blockdev-create, ...) to conclude, returns its error as
    /// [`Error::Job`], and dismisses it. Watches JOB_STATUS_CHANGE and polls
    /// `query-jobs`, so a job that concluded before the call is found too.
    /// Jobs needing `job-finalize` or `job-complete` are not driven here.
    pub async fn wait_job(&self, job_id: &str, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut events = self.events();
        let mut saw_end = false;
        loop {
            let jobs: Vec<JobInfo> = self
                .execute_as_timeout("query-jobs", None, self.step_timeout(deadline))
                .await?;
            match jobs.into_iter().find(|job| job.id == job_id) {
                Some(job) if job.status == JobStatus::Concluded => {
                    let dismissed = self.job_dismiss(job_id).await;
                    // The job's own failure matters more to the caller than a
                    // failed clean-up; a dead QEMU shows up on the next command.
                    return match job.error {
                        Some(error) => Err(self.job_error(job_id, error)),
                        None => dismissed,
                    };
                }
                Some(JobInfo {
                    status: JobStatus::Null,
                    error,
                    ..
                }) => {
                    return error.map_or(Ok(()), |error| Err(self.job_error(job_id, error)));
                }
                Some(_) => {}
                // Auto-dismissed right after we saw it end: its result is gone.
                None if saw_end => return Ok(()),
                None => {
                    return Err(Error::JobNotFound {
                        path: self.path().to_owned(),
                        job_id: job_id.to_owned(),
                    })
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    path: self.path().to_owned(),
                    command: format!("waiting for job {job_id}"),
                    timeout,
                });
            }
            let is_ours = |event: &Event| {
                event.name == "JOB_STATUS_CHANGE" && event.data_str("id") == Some(job_id)
            };
            if let Some(event) = Self::nap(&mut events, is_ours, deadline).await? {
                saw_end |= matches!(event.data_str("status"), Some("concluded" | "null"));
            }
        }
    }

    fn job_error(&self, job_id: &str, error: String) -> Error {
        Error::Job {
            path: self.path().to_owned(),
            job_id: job_id.to_owned(),
            error,
        }
    }

    /// Waits for the current migration (outgoing, or incoming on a QEMU
    /// started with `-incoming`) to end. Returns its final statistics
    /// when it completed, [`Error::Migration`] (with QEMU's `error-desc`)
    /// when it failed or was cancelled. Watches MIGRATION events and polls
    /// `query-migrate`, so it works without the `events` capability.
    pub async fn wait_migration(&self, timeout: Duration) -> Result<MigrationInfo, Error> {
        let deadline = Instant::now() + timeout;
        let mut events = self.events();
        loop {
            let info: MigrationInfo = self
                .execute_as_timeout("query-migrate", None, self.step_timeout(deadline))
                .await?;
            match &info.status {
                Some(MigrationStatus::Completed) => return Ok(info),
                Some(status) if status.is_terminal() => {
                    return Err(Error::Migration {
                        path: self.path().to_owned(),
                        status: status.clone(),
                        desc: info.error_desc,
                    })
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    path: self.path().to_owned(),
                    command: format!(
                        "waiting for migration (last status {})",
                        info.status.unwrap_or_default()
                    ),
                    timeout,
                });
            }
            Self::nap(&mut events, |event| event.name == "MIGRATION", deadline).await?;
        }
    }
}

async fn read_loop(mut reader: MessageReader, shared: Arc<Shared>) {
    // Any read error ends the connection just like end of stream: QEMU is
    // gone or the socket is unusable, and every waiter learns it the same way.
    while let Ok(Some(value)) = reader.next_value(Some(&shared.unexpected_messages)).await {
        shared.dispatch(value);
    }
    shared.shut_down();
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = lines.recv().await {
        if write.write_all(&line).await.is_err() {
            shared.shut_down();
            return;
        }
    }
}
