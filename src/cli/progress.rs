//! Progress of long client commands (preload, migrate, backup, restore, audit verify):
//! a bar on a terminal, and a plain line every few seconds otherwise (a log, CI), both
//! on stderr so the command's own output stays clean.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    what: String,
    total: Option<u64>,
    shown: Shown,
}

enum Shown {
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
}

struct Lines {
    done: u64,
    started: Instant,
    last: Instant,
}

impl Progress {
    /// Progress towards `total` items (`None`: unknown), described by `what`.
    pub fn new(what: &str, total: Option<u64>) -> Self {
        let shown = if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(total) => ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{msg} {spinner} {pos} ({per_sec})")
                        .expect("a valid template"),
                ),
            };
            bar.set_message(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            Shown::Bar(bar)
        } else {
            let now = Instant::now();
            Shown::Lines(Mutex::new(Lines {
                done: 0,
                started: now,
                last: now,
            }))
        };
        Self {
            what: what.to_string(),
            total,
            shown,
        }
    }

    pub fn add(&self, items: u64) {
        match &self.shown {
            Shown::Bar(bar) => bar.inc(items),
            Shown::Lines(lines) => {
                let mut lines = lines.lock().unwrap_or_else(|e| e.into_inner());
                lines.done += items;
                if lines.last.elapsed() >= LINE_EVERY {
                    lines.last = Instant::now();
                    eprintln!("{}", self.line(lines.done, lines.started.elapsed()));
                }
            }
        }
    }

    /// Ends the display with a last line saying how much was done and how fast.
    pub fn finish(self) {
        match &self.shown {
            Shown::Bar(bar) => bar.finish(),
            Shown::Lines(lines) => {
                let lines = lines.lock().unwrap_or_else(|e| e.into_inner());
                eprintln!("{}", self.line(lines.done, lines.started.elapsed()));
            }
        }
    }

    fn line(&self, done: u64, elapsed: Duration) -> String {
        let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
        match self.total {
            Some(total) => format!(
                "{}: {done}/{total} ({:.0}%), {rate:.0}/s, {:.0} s",
                self.what,
                done as f64 * 100.0 / total.max(1) as f64,
                elapsed.as_secs_f64()
            ),
            None => format!(
                "{}: {done}, {rate:.0}/s, {:.0} s",
                self.what,
                elapsed.as_secs_f64()
            ),
        }
    }
}
