//! Progress of the `parley` subcommands that read or write many events (export, import,
//! rebuild) or conversations (verify): a bar with what is done, rate and ETA on a terminal, and a plain line
//! every few seconds otherwise, so CI logs and pipes get a record rather than escape codes.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the plain (non-terminal) form prints a line.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// Progress of one long task, counted in events. Writes to standard error only, so standard
/// output stays the command's result (`--json`, an export).
pub struct Progress {
    what: String,
    /// What is counted, plural: `events` unless [`Progress::counting`] says otherwise.
    unit: &'static str,
    total: Option<u64>,
    started: Instant,
    form: Form,
}

enum Form {
    Bar(ProgressBar),
    Plain(Mutex<Plain>),
    Silent,
}

struct Plain {
    done: u64,
    printed_at: Instant,
}

impl Progress {
    /// A bar on a terminal, plain lines otherwise. `total` is the number of events expected,
    /// when known (it gives the ETA).
    pub fn new(what: impl Into<String>, total: Option<u64>) -> Progress {
        Progress::counting(what, total, "events")
    }

    /// [`new`](Self::new), counting `unit` (plural: `conversations`) rather than events.
    pub fn counting(what: impl Into<String>, total: Option<u64>, unit: &'static str) -> Progress {
        let form = if std::io::stderr().is_terminal() {
            Form::Bar(bar(total, unit))
        } else {
            Form::Plain(Mutex::new(Plain {
                done: 0,
                printed_at: Instant::now(),
            }))
        };
        Progress::with_form(what.into(), unit, total, form)
    }

    /// Progress that shows nothing (tests, `--quiet`).
    pub fn silent(what: impl Into<String>) -> Progress {
        Progress::with_form(what.into(), "events", None, Form::Silent)
    }

    fn with_form(what: String, unit: &'static str, total: Option<u64>, form: Form) -> Progress {
        if let Form::Bar(bar) = &form {
            bar.set_message(what.clone());
        }
        Progress {
            what,
            unit,
            total,
            started: Instant::now(),
            form,
        }
    }

    /// `n` more done.
    pub fn advance(&self, n: u64) {
        match &self.form {
            Form::Bar(bar) => bar.inc(n),
            Form::Plain(plain) => {
                let mut plain = plain.lock().expect("progress lock is never poisoned");
                plain.done += n;
                if plain.printed_at.elapsed() >= PLAIN_EVERY {
                    plain.printed_at = Instant::now();
                    eprintln!("{}", self.line(plain.done));
                }
            }
            Form::Silent => {}
        }
    }

    /// The task is over: the bar is replaced by a summary line (also printed in plain form).
    pub fn finish(&self, done: u64) {
        if let Form::Bar(bar) = &self.form {
            bar.finish_and_clear();
        }
        if !matches!(self.form, Form::Silent) {
            eprintln!("{}", self.line(done));
        }
    }

    /// "export: 120000 / 500000 events, 41230 events/s, ETA 9 s"
    fn line(&self, done: u64) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let (what, unit) = (&self.what, self.unit);
        match self.total {
            Some(total) if rate > 0.0 && done < total => format!(
                "{what}: {done} / {total} {unit}, {rate:.0} {unit}/s, ETA {:.0} s",
                (total - done) as f64 / rate
            ),
            Some(total) => {
                format!("{what}: {done} / {total} {unit}, {rate:.0} {unit}/s, {elapsed:.1} s")
            }
            None => format!("{what}: {done} {unit}, {rate:.0} {unit}/s, {elapsed:.1} s"),
        }
    }
}

fn bar(total: Option<u64>, unit: &str) -> ProgressBar {
    let (bar, template) = match total {
        Some(total) => (
            ProgressBar::new(total),
            format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{per_sec}}, ETA {{eta}}"),
        ),
        None => (
            ProgressBar::new_spinner(),
            format!("{{spinner}} {{msg}}: {{pos}} {unit}, {{per_sec}}"),
        ),
    };
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template(&template).expect("valid progress template"));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_line_gives_count_rate_and_eta_when_the_total_is_known() {
        let progress = Progress::silent("export");
        let line = progress.line(0);
        assert!(line.starts_with("export: 0 events"), "{line}");
        let known = Progress {
            total: Some(10),
            ..Progress::silent("import")
        };
        std::thread::sleep(Duration::from_millis(5));
        let line = known.line(5);
        assert!(line.starts_with("import: 5 / 10 events, "), "{line}");
        assert!(line.contains("ETA"), "{line}");
        let line = known.line(10);
        assert!(!line.contains("ETA"), "{line}");
        let conversations = Progress {
            unit: "conversations",
            ..known
        };
        let line = conversations.line(10);
        assert!(
            line.starts_with("import: 10 / 10 conversations, ")
                && line.contains(" conversations/s, "),
            "{line}"
        );
    }
}
