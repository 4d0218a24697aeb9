//! `guestctl SOCKET COMMAND [ARGS]`: talks to the test guest's control channel
//! from a shell script, so the demo can show that a revert really brings back
//! the guest's memory and disks.
//!
//! Commands: `ping`, `set VALUE`, `get`, `counter`, `write DISK OFFSET LEN SEED`,
//! `sum DISK OFFSET LEN`.

use std::process::ExitCode;
use std::time::Duration;

use vmsnap_testguest::Guest;

const USAGE: &str = "usage: guestctl SOCKET ping|get|counter|set VALUE|write DISK OFFSET LEN SEED|sum DISK OFFSET LEN";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("guestctl: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<String, String> {
    let (socket, command) = match args {
        [socket, command @ ..] if !command.is_empty() => (socket, command),
        _ => return Err(USAGE.to_owned()),
    };
    let mut guest = Guest::connect(socket, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let number = |text: &str| -> Result<u64, String> {
        text.parse()
            .map_err(|_| format!("'{text}' is not a number\n{USAGE}"))
    };
    let result = match command.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["ping"] => guest.ping(),
        ["get"] => guest.ram_value(),
        ["counter"] => guest.counter().map(|c| c.to_string()),
        ["set", value] => guest.set_ram_value(value).map(|()| value.to_owned()),
        ["write", disk, offset, len, seed] => guest
            .write_pattern(disk, number(offset)?, number(len)?, number(seed)?)
            .map(|()| format!("wrote {len} bytes at {offset} on {disk}")),
        ["sum", disk, offset, len] => guest.disk_checksum(disk, number(offset)?, number(len)?),
        _ => return Err(USAGE.to_owned()),
    };
    result.map_err(|e| e.to_string())
}
