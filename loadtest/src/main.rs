//! `loadtest`: drive a Socket.IO server speaking the fleet's default app protocol.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use loadtest::procs;
use loadtest::report::Report;
use loadtest::scenario::{Scenario, Transport};

/// Socket.IO load generator: clients join rooms, publishers publish, every delivery is
/// accounted for exactly once. Flags override the scenario file.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A scenario YAML file (every key optional).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Server URL, e.g. http://127.0.0.1:8000; several comma-separated are used in turn.
    #[arg(long)]
    url: Option<String>,
    /// Engine.IO path.
    #[arg(long)]
    path: Option<String>,
    /// Clients.
    #[arg(long, short)]
    clients: Option<usize>,
    /// New clients per second.
    #[arg(long)]
    connect_rate: Option<f64>,
    /// websocket | polling | upgrade | mixed (even clients websocket, odd upgrade).
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// Rooms (client i joins room i mod rooms).
    #[arg(long)]
    rooms: Option<usize>,
    /// Publishers (clients 0..publishers).
    #[arg(long)]
    publishers: Option<usize>,
    /// Publishes per second per publisher.
    #[arg(long)]
    rate: Option<f64>,
    /// Flood: unacknowledged publishes in flight per publisher.
    #[arg(long)]
    window: Option<usize>,
    /// Publishes per publisher, then stop (default: publish for the whole duration).
    #[arg(long)]
    messages: Option<u64>,
    /// Bytes of padding per publish.
    #[arg(long)]
    payload: Option<usize>,
    /// Seconds of publishing.
    #[arg(long, short)]
    duration: Option<f64>,
    /// Seconds to keep listening after the last publish.
    #[arg(long)]
    settle: Option<f64>,
    /// Seconds allowed for connecting before publishing starts.
    #[arg(long)]
    connect_timeout: Option<f64>,
    /// Reconnect dropped clients: true or false.
    #[arg(long)]
    reconnect: Option<bool>,
    /// Local source addresses: 127.0.0.2 or 127.0.0.2-127.0.0.9 (repeatable).
    #[arg(long = "source")]
    sources: Vec<String>,
    /// Generator processes.
    #[arg(long)]
    procs: Option<usize>,
    /// Tolerated fraction of missing + duplicate deliveries.
    #[arg(long)]
    max_loss: Option<f64>,
    /// The app's protocol: rooms (the default worker) or chat (apps/chat).
    #[arg(long, value_enum)]
    app: Option<loadtest::scenario::AppProtocol>,
    /// A token every client sends in its CONNECT auth payload, for a fleet with
    /// `auth.mode: jwt` or `proxy` (default: $LOADTEST_TOKEN; none).
    #[arg(long, env = "LOADTEST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Write an event log here (process I of several: FILE.I); see the `events` module.
    #[arg(long)]
    events: Option<String>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, hide = true)]
    child: Option<usize>,
    #[arg(long, hide = true)]
    scenario_json: Option<String>,
}

impl Args {
    fn scenario(&self) -> Result<Scenario, String> {
        let mut s = match (&self.scenario_json, &self.scenario) {
            (Some(json), _) => serde_json::from_str(json).map_err(|e| e.to_string())?,
            (None, Some(path)) => Scenario::from_file(path)?,
            (None, None) => Scenario::default(),
        };
        macro_rules! over {
            ($($f:ident => $g:ident),*) => {$( if let Some(v) = self.$f.clone() { s.$g = v; } )*};
        }
        over!(url => url, path => path, clients => clients, connect_rate => connect_rate,
              transport => transport, rooms => rooms, publishers => publishers, rate => rate,
              payload => payload, duration => duration_secs, settle => settle_secs,
              connect_timeout => connect_timeout_secs, reconnect => reconnect, procs => procs,
              max_loss => max_loss);
        if self.window.is_some() {
            s.window = self.window;
        }
        if let Some(app) = self.app {
            s.app = app;
        }
        if self.events.is_some() {
            s.events.clone_from(&self.events);
        }
        if self.token.is_some() {
            s.token.clone_from(&self.token);
        }
        if self.messages.is_some() {
            s.messages = self.messages;
        }
        if !self.sources.is_empty() {
            s.sources = self.sources.clone();
        }
        s.check().map_err(|e| format!("scenario: {e}"))?;
        Ok(s)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let scenario = match args.scenario() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    // A client holds one socket (two with polling): as many as the machine allows.
    if let Err(e) = shared::fd_limit::raise_nofile() {
        eprintln!("loadtest: cannot raise the open-file limit: {e}");
    }
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    if let Some(index) = args.child {
        rt.block_on(procs::run_child(&scenario, index));
        return ExitCode::SUCCESS;
    }
    let snapshot = if scenario.procs > 1 {
        match rt.block_on(procs::run_parent(&scenario)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("loadtest: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        rt.block_on(procs::run_solo(&scenario))
    };
    let report = Report::new(&scenario, &snapshot);
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).expect("a report serialises");
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("loadtest: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
