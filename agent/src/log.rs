//! Minimal logging to stderr. Under systemd (`JOURNAL_STREAM` set) lines carry `<N>` priority
//! prefixes that journald turns into log levels; on a terminal they carry a UTC time instead.
//! A tracing stack would double the agent's size for no gain on one thread.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy)]
pub enum Level {
    Error,
    Warn,
    Info,
}

fn under_journald() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| std::env::var_os("JOURNAL_STREAM").is_some())
}

pub fn write(level: Level, message: std::fmt::Arguments<'_>) {
    let (priority, name) = match level {
        Level::Error => (3, "ERROR"),
        Level::Warn => (4, "WARN"),
        Level::Info => (6, "INFO"),
    };
    if under_journald() {
        eprintln!("<{priority}>{message}");
    } else {
        eprintln!(
            "{} {name} {message}",
            httpdate::fmt_http_date(std::time::SystemTime::now())
        );
    }
}

#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) } }
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($t)*)) } }
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($t)*)) } }
