//! Running the clients in one process or spread over several (`procs`), with one live line a
//! second and one merged result either way.
//!
//! A child is this same binary with `--child I`: it runs clients `i` with `i % procs == I`,
//! writes JSON lines on stdout (progress, ready, result), and starts publishing when the parent
//! writes `go` on its stdin, so every room is complete in every process before anyone publishes.

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::events::EventLog;
use crate::run::{Control, Progress, run_share};
use crate::scenario::Scenario;
use crate::stats::Snapshot;

/// A child's message to the parent: one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChildMsg {
    /// Once a second.
    Progress(Progress),
    /// Every client connected or failed.
    Ready(u64, u64),
    /// The end.
    Result(Box<Snapshot>),
}

/// Formats the live line.
pub fn live_line(p: &Progress, rates: (f64, f64)) -> String {
    format!(
        "[{:>4.0}s] connected {:>6}  published {:>8.0}/s  delivered {:>9.0}/s  errors {:>5}  p99 {:.2} ms",
        p.elapsed,
        p.connected,
        rates.0,
        rates.1,
        p.errors,
        p.p99_us as f64 / 1000.0
    )
}

/// Opens this process's event log, if the scenario asks for one (a file that cannot be
/// created is reported, and the run goes on without it).
fn event_log(scenario: &Scenario, child: Option<usize>) -> Option<EventLog> {
    let base = scenario.events.as_deref()?;
    let path = EventLog::path_for(base, child);
    EventLog::create(std::path::Path::new(&path))
        .map_err(|e| eprintln!("loadtest: event log {path}: {e}"))
        .ok()
}

/// Runs everything in this process.
pub async fn run_solo(scenario: &Scenario) -> Snapshot {
    struct Solo;
    impl Control for Solo {
        fn progress(&mut self, p: &Progress, rates: (f64, f64)) {
            eprintln!("{}", live_line(p, rates));
        }
        async fn ready(&mut self, ready: u64, failed: u64) {
            eprintln!("ready: {ready} connected, {failed} failed; publishing");
        }
    }
    let all = (0..scenario.clients).collect();
    let events = event_log(scenario, None);
    run_share(scenario, all, scenario.connect_rate, events, &mut Solo).await
}

/// Runs as child `index` of a multi-process run.
pub async fn run_child(scenario: &Scenario, index: usize) -> Snapshot {
    struct Child;
    fn emit(msg: &ChildMsg) {
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, msg);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
    impl Control for Child {
        fn progress(&mut self, p: &Progress, _rates: (f64, f64)) {
            emit(&ChildMsg::Progress(p.clone()));
        }
        async fn ready(&mut self, ready: u64, failed: u64) {
            emit(&ChildMsg::Ready(ready, failed));
            let mut line = String::new();
            let mut stdin = BufReader::new(tokio::io::stdin());
            // "go", or the parent is gone (EOF): either way, proceed.
            let _ = stdin.read_line(&mut line).await;
        }
    }
    let mine = (0..scenario.clients)
        .filter(|i| i % scenario.procs == index)
        .collect();
    let snap = run_share(
        scenario,
        mine,
        scenario.connect_rate / scenario.procs as f64,
        event_log(scenario, Some(index)),
        &mut Child,
    )
    .await;
    emit(&ChildMsg::Result(Box::new(snap.clone())));
    snap
}

/// Runs `procs` children and merges what they report.
pub async fn run_parent(scenario: &Scenario) -> Result<Snapshot, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let json = serde_json::to_string(scenario).expect("a scenario serialises");
    let (tx, mut rx) = mpsc::channel::<(usize, Option<ChildMsg>)>(1024);
    let mut stdins = Vec::new();
    let mut children = Vec::new();
    for i in 0..scenario.procs {
        let mut child = Command::new(&exe)
            .arg("--child")
            .arg(i.to_string())
            .arg("--scenario-json")
            .arg(&json)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting generator process: {e}"))?;
        stdins.push(child.stdin.take().expect("piped"));
        let stdout = child.stdout.take().expect("piped");
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(msg) = serde_json::from_str::<ChildMsg>(&line) {
                    let _ = tx.send((i, Some(msg))).await;
                }
            }
            let _ = tx.send((i, None)).await;
        });
        children.push(child);
    }
    drop(tx);

    let n = scenario.procs;
    let mut progress = vec![Progress::default(); n];
    let mut ready = vec![None; n];
    let mut results: Vec<Option<Snapshot>> = vec![None; n];
    let mut last = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut went = false;
    while results.iter().any(Option::is_none) {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some((i, Some(ChildMsg::Progress(p)))) => progress[i] = p,
                Some((i, Some(ChildMsg::Ready(r, f)))) => ready[i] = Some((r, f)),
                Some((i, Some(ChildMsg::Result(s)))) => results[i] = Some(*s),
                Some((i, None)) if results[i].is_none() => {
                    return Err(format!("generator process {i} ended without a result"));
                }
                Some(_) => {}
                None => break,
            },
            _ = tick.tick() => {
                let mut all = Progress::default();
                for p in &progress {
                    all.merge(p);
                }
                let rates = ((all.published - last.0.min(all.published)) as f64,
                             (all.delivered - last.1.min(all.delivered)) as f64);
                last = (all.published, all.delivered);
                eprintln!("{}", live_line(&all, rates));
            }
        }
        if !went && ready.iter().all(Option::is_some) {
            went = true;
            let (r, f) = ready
                .iter()
                .flatten()
                .fold((0, 0), |(a, b), (r, f)| (a + r, b + f));
            eprintln!("ready: {r} connected, {f} failed over {n} processes; publishing");
            for stdin in &mut stdins {
                let _ = stdin.write_all(b"go\n").await;
                let _ = stdin.flush().await;
            }
        }
    }
    for mut c in children {
        let _ = c.wait().await;
    }
    let mut merged = Snapshot::default();
    for r in results.into_iter().flatten() {
        merged.merge(&r);
    }
    Ok(merged)
}
