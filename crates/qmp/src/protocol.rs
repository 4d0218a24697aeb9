//! QMP wire messages: the greeting, command replies and events, decoded
//! tolerantly so that fields and events a newer QEMU adds never break us.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A QEMU version, so callers can choose features (e.g. `file:` migration
/// URIs need 8.2) by what the running QEMU supports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Major version (7 for 7.2.0).
    #[serde(default)]
    pub major: u32,
    /// Minor version (2 for 7.2.0).
    #[serde(default)]
    pub minor: u32,
    /// Micro version (0 for 7.2.0).
    #[serde(default)]
    pub micro: u32,
    /// Distribution package string (e.g. "Debian 1:7.2+dfsg-7"), may be empty.
    #[serde(default)]
    pub package: String,
}

impl Version {
    /// Whether this QEMU is `major.minor` or newer.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package.trim())?;
        }
        Ok(())
    }
}

/// The `VersionInfo` shape QEMU uses in the greeting and in `query-version`.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct VersionInfo {
    #[serde(default)]
    pub qemu: VersionTriple,
    #[serde(default)]
    pub package: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct VersionTriple {
    #[serde(default)]
    pub major: u32,
    #[serde(default)]
    pub minor: u32,
    #[serde(default)]
    pub micro: u32,
}

impl From<VersionInfo> for Version {
    fn from(info: VersionInfo) -> Version {
        Version {
            major: info.qemu.major,
            minor: info.qemu.minor,
            micro: info.qemu.micro,
            package: info.package,
        }
    }
}

/// What QEMU announces on connect: its version and the optional protocol
/// capabilities (e.g. `oob`) it offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Greeting {
    /// The QEMU version.
    pub version: Version,
    /// Capabilities offered in the greeting (we enable none of them).
    pub capabilities: Vec<String>,
}

/// When QEMU emitted an event (host wall-clock time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub seconds: i64,
    /// Microseconds within the second.
    #[serde(default)]
    pub microseconds: i64,
}

/// An asynchronous QMP event (STOP, RESUME, JOB_STATUS_CHANGE, MIGRATION, ...).
/// `data` is kept as raw JSON so any event, known or not, can be delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The event name, e.g. `"STOP"`.
    #[serde(rename = "event")]
    pub name: String,
    /// The event's payload; `Value::Null` when QEMU sent none.
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it.
    #[serde(default)]
    pub timestamp: Timestamp,
}

impl Event {
    /// A string field of `data`, the common way events identify their object
    /// (`id` of a job, `device`, `status`, ...).
    pub fn data_str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

/// One message from QEMU, classified.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message {
    Greeting(Greeting),
    Reply {
        id: Option<Value>,
        result: Result<Value, QmpErrorBody>,
    },
    Event(Event),
    Unknown(Value),
}

/// The `error` member of a failed reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct QmpErrorBody {
    #[serde(default)]
    pub class: String,
    #[serde(default)]
    pub desc: String,
}

#[derive(Deserialize)]
struct GreetingBody {
    #[serde(default)]
    version: VersionInfo,
    #[serde(default)]
    capabilities: Vec<Value>,
}

/// Sorts a decoded JSON object into greeting, reply, event or unknown,
/// never failing: a shape we do not understand becomes `Unknown`.
pub(crate) fn classify(value: Value) -> Message {
    let Some(object) = value.as_object() else {
        return Message::Unknown(value);
    };
    if let Some(greeting) = object.get("QMP") {
        return match GreetingBody::deserialize(greeting) {
            Ok(body) => Message::Greeting(Greeting {
                version: body.version.into(),
                capabilities: body
                    .capabilities
                    .into_iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect(),
            }),
            Err(_) => Message::Unknown(value),
        };
    }
    if object.get("event").is_some_and(Value::is_string) {
        return match Event::deserialize(&value) {
            Ok(event) => Message::Event(event),
            Err(_) => Message::Unknown(value),
        };
    }
    let id = object.get("id").cloned();
    if let Some(ret) = object.get("return") {
        return Message::Reply {
            id,
            result: Ok(ret.clone()),
        };
    }
    if let Some(error) = object.get("error") {
        let body = QmpErrorBody::deserialize(error).unwrap_or_else(|_| QmpErrorBody {
            class: "GenericError".to_owned(),
            desc: error.to_string(),
        });
        return Message::Reply {
            id,
            result: Err(body),
        };
    }
    Message::Unknown(value)
}

/// Splits a byte stream into JSON values. QEMU normally sends one object per
/// line, but a pretty-printing monitor spreads one over many, so we parse
/// values rather than lines and skip garbage up to the next newline.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    buffer: Vec<u8>,
    /// Whether a newline arrived since the last `NeedMore`: QEMU ends every
    /// message with one, so a long reply arriving in many reads is parsed
    /// once when complete, not once per read.
    newline_seen: bool,
}

/// What the decoder found in its buffer.
#[derive(Debug, PartialEq)]
pub(crate) enum Decoded {
    /// A complete value.
    Value(Value),
    /// Bytes that are not JSON were dropped (up to the next newline).
    Garbage(String),
    /// Not enough bytes for a complete value yet.
    NeedMore,
}

impl Decoder {
    /// Appends bytes read from the socket.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
        self.newline_seen |= bytes.contains(&b'\n');
    }

    /// Returns the next complete value, garbage report or `NeedMore`.
    pub fn next(&mut self) -> Decoded {
        let start = self
            .buffer
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buffer.len());
        self.buffer.drain(..start);
        if self.buffer.is_empty() {
            self.newline_seen = false;
        }
        if !self.newline_seen {
            return Decoded::NeedMore;
        }
        let mut stream = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<Value>();
        match stream.next() {
            Some(Ok(value)) => {
                let consumed = stream.byte_offset();
                self.buffer.drain(..consumed);
                Decoded::Value(value)
            }
            Some(Err(e)) if e.is_eof() => {
                self.newline_seen = false;
                Decoded::NeedMore
            }
            Some(Err(e)) => {
                let end = self
                    .buffer
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(self.buffer.len(), |p| p + 1);
                let dropped: Vec<u8> = self.buffer.drain(..end).collect();
                Decoded::Garbage(format!(
                    "{e} in {:?}",
                    String::from_utf8_lossy(&dropped[..dropped.len().min(200)])
                ))
            }
            None => {
                self.newline_seen = false;
                Decoded::NeedMore
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn greeting_of_qemu_7_2_is_parsed() {
        let raw = json!({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},
            "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}});
        let Message::Greeting(greeting) = classify(raw) else {
            panic!("not a greeting")
        };
        assert_eq!(
            greeting.version,
            Version {
                major: 7,
                minor: 2,
                micro: 22,
                package: "Debian 1:7.2+dfsg-7+deb12u18".into()
            }
        );
        assert_eq!(greeting.capabilities, vec!["oob".to_string()]);
        assert!(greeting.version.at_least(7, 2));
        assert!(greeting.version.at_least(6, 9));
        assert!(!greeting.version.at_least(7, 3));
        assert!(!greeting.version.at_least(8, 0));
    }

    #[test]
    fn greeting_with_unknown_fields_and_missing_package() {
        let raw = json!({"QMP": {"version": {"qemu": {"major": 9, "minor": 1, "micro": 0},
            "future": 1}, "capabilities": ["oob", {"weird": true}], "extra": []}});
        let Message::Greeting(greeting) = classify(raw) else {
            panic!("not a greeting")
        };
        assert_eq!(greeting.version.major, 9);
        assert_eq!(greeting.version.package, "");
        assert_eq!(greeting.capabilities, vec!["oob".to_string()]);
    }

    #[test]
    fn replies_with_and_without_id() {
        assert_eq!(
            classify(json!({"return": {"a": 1}, "id": 7})),
            Message::Reply {
                id: Some(json!(7)),
                result: Ok(json!({"a": 1}))
            }
        );
        assert_eq!(
            classify(json!({"return": {}})),
            Message::Reply {
                id: None,
                result: Ok(json!({}))
            }
        );
        assert_eq!(
            classify(json!({"error": {"class": "CommandNotFound",
                "desc": "The command foo has not been found"}, "id": "x"})),
            Message::Reply {
                id: Some(json!("x")),
                result: Err(QmpErrorBody {
                    class: "CommandNotFound".into(),
                    desc: "The command foo has not been found".into()
                })
            }
        );
    }

    #[test]
    fn malformed_error_body_still_becomes_an_error() {
        let Message::Reply {
            result: Err(body), ..
        } = classify(json!({"error": "boom", "id": 1}))
        else {
            panic!("not an error reply")
        };
        assert_eq!(body.class, "GenericError");
        assert!(body.desc.contains("boom"));
    }

    #[test]
    fn events_known_unknown_and_without_data() {
        let Message::Event(event) = classify(json!({"event": "JOB_STATUS_CHANGE",
            "data": {"status": "concluded", "id": "j1", "new": 3},
            "timestamp": {"seconds": 1700000000, "microseconds": 123456}}))
        else {
            panic!("not an event")
        };
        assert_eq!(event.name, "JOB_STATUS_CHANGE");
        assert_eq!(event.data_str("id"), Some("j1"));
        assert_eq!(event.data_str("status"), Some("concluded"));
        assert_eq!(
            event.timestamp,
            Timestamp {
                seconds: 1_700_000_000,
                microseconds: 123_456
            }
        );

        let Message::Event(event) = classify(json!({"event": "STOP"})) else {
            panic!("not an event")
        };
        assert_eq!(event.name, "STOP");
        assert_eq!(event.data, Value::Null);
        assert_eq!(event.timestamp, Timestamp::default());

        let Message::Event(event) =
            classify(json!({"event": "SOMETHING_NEW_IN_QEMU_12", "data": [1, 2], "x": 1}))
        else {
            panic!("not an event")
        };
        assert_eq!(event.data, json!([1, 2]));
    }

    #[test]
    fn unknown_shapes_do_not_fail() {
        assert!(matches!(classify(json!([1, 2])), Message::Unknown(_)));
        assert!(matches!(classify(json!({"hello": 1})), Message::Unknown(_)));
        assert!(matches!(classify(json!({"event": 5})), Message::Unknown(_)));
        assert!(matches!(classify(json!({"QMP": 5})), Message::Unknown(_)));
        assert!(matches!(
            classify(json!({"event": "X", "timestamp": "yesterday"})),
            Message::Unknown(_)
        ));
    }

    #[test]
    fn decoder_handles_split_joined_pretty_and_garbage_input() {
        let mut decoder = Decoder::default();
        assert_eq!(decoder.next(), Decoded::NeedMore);
        decoder.extend(b"{\"return\": {}, \"id\"");
        assert_eq!(decoder.next(), Decoded::NeedMore);
        decoder.extend(b": 1}\r\n{\"event\": \"STOP\"}\r\n{\n  \"return\":\n");
        assert_eq!(
            decoder.next(),
            Decoded::Value(json!({"return": {}, "id": 1}))
        );
        assert_eq!(decoder.next(), Decoded::Value(json!({"event": "STOP"})));
        assert_eq!(decoder.next(), Decoded::NeedMore);
        decoder.extend(b"  5\n}\nnot json here\n{\"return\": 2}\n");
        assert_eq!(decoder.next(), Decoded::Value(json!({"return": 5})));
        assert!(matches!(decoder.next(), Decoded::Garbage(g) if g.contains("not json")));
        assert_eq!(decoder.next(), Decoded::Value(json!({"return": 2})));
        assert_eq!(decoder.next(), Decoded::NeedMore);
        // Without its terminating newline a message is not looked at yet.
        decoder.extend(b"{\"return\": 3}");
        assert_eq!(decoder.next(), Decoded::NeedMore);
        decoder.extend(b"\r\n");
        assert_eq!(decoder.next(), Decoded::Value(json!({"return": 3})));
    }
}
