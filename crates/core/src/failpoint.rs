//! Named crash points, so tests can prove crash safety (DESIGN §5.4) by
//! killing vmsnap at every step of every operation.
//!
//! Only debug builds (what `cargo test` builds) honour them; release builds
//! compile [`hit`] to nothing, so no environment variable can make a
//! production vmsnap kill itself.
//!
//! - `VMSNAP_FAILPOINTS=a,b`: SIGKILL this process when it reaches step `a`
//!   or `b`. `a@3` fires on the third time `a` is reached.
//! - `VMSNAP_FAILPOINT_LOG=FILE`: append the name of every step reached, one
//!   per line, so a test can enumerate an operation's steps before killing
//!   it at each.

/// Marks a step of a multi-step operation; a test may ask to die here.
pub fn hit(name: &str) {
    #[cfg(debug_assertions)]
    armed::hit(name);
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(debug_assertions)]
mod armed {
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::Mutex;

    static HITS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

    pub(super) fn hit(name: &str) {
        if let Some(log) = std::env::var_os("VMSNAP_FAILPOINT_LOG") {
            if let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let _ = writeln!(file, "{name}");
            }
        }
        let Ok(wanted) = std::env::var("VMSNAP_FAILPOINTS") else {
            return;
        };
        let count = {
            let mut guard = HITS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let counts = guard.get_or_insert_with(HashMap::new);
            let count = counts.entry(name.to_owned()).or_insert(0);
            *count += 1;
            *count
        };
        if wanted
            .split(',')
            .filter_map(|entry| parse(entry.trim()))
            .any(|(wanted_name, nth)| wanted_name == name && nth == count)
        {
            // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }

    /// `name` or `name@N` (N ≥ 1); anything else is ignored.
    pub(super) fn parse(entry: &str) -> Option<(&str, u32)> {
        match entry.split_once('@') {
            Some((name, nth)) => Some((name, nth.parse().ok().filter(|n| *n >= 1)?)),
            None if !entry.is_empty() => Some((entry, 1)),
            None => None,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::parse;

        #[test]
        fn parses_names_and_occurrences() {
            assert_eq!(parse("create.overlays"), Some(("create.overlays", 1)));
            assert_eq!(parse("create.overlays@3"), Some(("create.overlays", 3)));
            assert_eq!(parse("x@0"), None);
            assert_eq!(parse("x@y"), None);
            assert_eq!(parse(""), None);
        }
    }
}
