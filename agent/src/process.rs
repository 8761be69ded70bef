//! Runs a command with a deadline and a cap on its output: past either, its whole process group is
//! killed. For actions the VM endpoint runs on an operator's behalf.

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a bounded run ended.
#[derive(Debug)]
pub struct Finished {
    /// `None` when it was killed (timeout or too much output).
    pub exit_code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
    /// Stdout and stderr together went past the cap.
    pub overflowed: bool,
    pub elapsed: Duration,
}

/// Runs `command` (stdin closed) in a process group of its own.
pub fn run_bounded(
    mut command: Command,
    timeout: Duration,
    max_output: usize,
) -> std::io::Result<Finished> {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let total = Arc::new(Mutex::new(0usize));
    let overflowed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .map(|stream| {
        let (total, overflowed) = (total.clone(), overflowed.clone());
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let Some(mut stream) = stream else {
                return kept;
            };
            let mut buffer = [0u8; 8192];
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                let mut total = total.lock().unwrap_or_else(|p| p.into_inner());
                *total += n;
                if *total > max_output {
                    overflowed.store(true, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                kept.extend_from_slice(&buffer[..n]);
            }
            kept
        })
    })
    .collect();
    let deadline = started + timeout;
    let pid = rustix::process::Pid::from_child(&child);
    let kill = |child: &mut std::process::Child| {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::Kill);
        let _ = child.kill();
        child.wait()
    };
    let (status, timed_out) = loop {
        if overflowed.load(std::sync::atomic::Ordering::SeqCst) {
            break (kill(&mut child)?, false);
        }
        if let Some(status) = child.try_wait()? {
            break (status, false);
        }
        if Instant::now() >= deadline {
            break (kill(&mut child)?, true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Whatever the command left running in its group would keep the pipes open.
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::Kill);
    let mut outputs = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let stdout = outputs.next().unwrap_or_default();
    let stderr = outputs.next().unwrap_or_default();
    let overflowed = overflowed.load(std::sync::atomic::Ordering::SeqCst);
    Ok(Finished {
        exit_code: if timed_out || overflowed {
            None
        } else {
            status.code()
        },
        stdout,
        stderr,
        timed_out,
        overflowed,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn output_exit_code_timeout_and_overflow() {
        let done = run_bounded(
            sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(5),
            1024,
        )
        .unwrap();
        assert_eq!(
            (done.exit_code, &done.stdout[..], &done.stderr[..]),
            (Some(3), &b"out\n"[..], &b"err\n"[..])
        );

        // A child that outlives the shell is killed with it.
        let done =
            run_bounded(sh("sleep 30 & sleep 30"), Duration::from_millis(300), 1024).unwrap();
        assert!(done.timed_out && done.exit_code.is_none(), "{done:?}");
        assert!(done.elapsed < Duration::from_secs(10), "{done:?}");

        let done = run_bounded(
            sh("head -c 100000 /dev/zero; sleep 30"),
            Duration::from_secs(20),
            4096,
        )
        .unwrap();
        assert!(done.overflowed && !done.timed_out, "{done:?}");
        assert!(done.stdout.len() <= 4096);
        assert!(done.elapsed < Duration::from_secs(10), "{done:?}");
    }
}
