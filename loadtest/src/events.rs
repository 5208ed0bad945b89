//! An optional event log (`--events FILE`) for analyses the totals cannot answer, such as
//! which deliveries a client on a given worker missed while another worker was down.
//!
//! One line per event, space-separated, times in Unix microseconds:
//! - `j CLIENT WORKER T`: client joined its room on WORKER (first connect and every reconnect);
//! - `d CLIENT T KIND`: client's connection dropped;
//! - `a P S ROOM WORKER SENT ACKED`: publish S of client P into room `rROOM`, sent from WORKER,
//!   acknowledged `ok`;
//! - `r CLIENT P S`: client received publish (P, S) for the first time;
//! - `e T KIND`: an error counted under KIND.
//!
//! Each generator process writes its own file: FILE itself when there is one process,
//! `FILE.I` for process I of several.

use std::fmt::Arguments;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

/// A buffered, shared event log.
pub struct EventLog {
    out: Mutex<BufWriter<File>>,
}

impl EventLog {
    /// Creates (truncates) the log at `path`.
    pub fn create(path: &Path) -> std::io::Result<EventLog> {
        Ok(EventLog {
            out: Mutex::new(BufWriter::with_capacity(1 << 16, File::create(path)?)),
        })
    }

    /// The file of generator process `child` (None: the only process).
    pub fn path_for(base: &str, child: Option<usize>) -> String {
        match child {
            Some(i) => format!("{base}.{i}"),
            None => base.to_owned(),
        }
    }

    /// Appends one line.
    pub fn line(&self, args: Arguments<'_>) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_fmt(args);
        let _ = out.write_all(b"\n");
    }

    /// Writes out what is buffered.
    pub fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_lines_and_names_child_files() {
        let path = std::env::temp_dir().join(format!("loadtest-events-{}", std::process::id()));
        let log = EventLog::create(&path).unwrap();
        log.line(format_args!("j {} {} {}", 3, "w1", 42));
        log.line(format_args!("r {} {} {}", 3, 0, 7));
        log.flush();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "j 3 w1 42\nr 3 0 7\n"
        );
        let _ = std::fs::remove_file(&path);
        assert_eq!(EventLog::path_for("/x/ev", Some(2)), "/x/ev.2");
        assert_eq!(EventLog::path_for("/x/ev", None), "/x/ev");
    }
}
