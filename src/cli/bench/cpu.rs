//! CPU time of the server (by process id) and of the bench itself, from `/proc`.

use std::time::Duration;

/// CPU time (user + system, all threads) of the server process, when its id is known,
/// and of this process, read from `/proc` at the start and end of a window.
pub(super) struct CpuClock {
    server_pid: Option<u32>,
    server: Option<Duration>,
    client: Option<Duration>,
}

impl CpuClock {
    pub(super) fn start(server_pid: Option<u32>) -> Self {
        Self {
            server_pid,
            server: server_pid.and_then(|pid| process_cpu(&pid.to_string())),
            client: process_cpu("self"),
        }
    }

    /// Server and client CPU time spent since `start`.
    pub(super) fn stop(self) -> (Option<Duration>, Option<Duration>) {
        let since =
            |before: Option<Duration>, now: Option<Duration>| Some(now?.saturating_sub(before?));
        (
            since(
                self.server,
                self.server_pid
                    .and_then(|pid| process_cpu(&pid.to_string())),
            ),
            since(self.client, process_cpu("self")),
        )
    }
}

/// utime + stime of `/proc/<pid>/stat`, or None where there is no such file (not Linux,
/// or no such process).
fn process_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; the fields
    // after it start with field 3, so utime (14) and stime (15) are the 12th and 13th.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks_per_sec = u64::try_from(ticks_per_sec).ok().filter(|t| *t > 0)?;
    Some(Duration::from_nanos(
        (utime + stime).saturating_mul(1_000_000_000 / ticks_per_sec),
    ))
}
