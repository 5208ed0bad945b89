//! The worker supervisor (Node's `cluster.fork`, supervised): runs `workers.count` worker
//! processes, prefixes their log lines with the worker id, restarts a crashed one with capped
//! backoff, and on shutdown lets every worker drain, then ends them. The count may change
//! while running (`resize`): new workers start, surplus ones drain and stop. Each worker
//! process gets its own handoff channel (see `handoff`), opened as it starts and closed as it
//! ends.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use shared::{Backoff, FleetConfig, Shutdown, ShutdownTrigger};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::metrics::METRICS;
use crate::proxy::handoff::{Channel, Handoffs};

/// A worker that ran this long before dying is restarted without waiting.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// Runs the workers of a fleet file.
pub struct Supervisor {
    /// The fleet file, passed on to each worker.
    pub config_path: PathBuf,
    /// Program and leading arguments of a worker.
    pub command: Vec<String>,
    /// How many workers: the fleet file's count, followed as it changes.
    pub count: watch::Receiver<u32>,
    /// How long a worker may take to drain before it is killed.
    pub drain_limit: Duration,
    /// Where the handoff channels go, when WebSockets are handed to workers.
    pub handoffs: Option<Arc<Handoffs>>,
}

impl Supervisor {
    /// The supervisor for a fleet file, running the configured command or the `worker`
    /// binary next to this executable, and opening a handoff channel per worker process in
    /// `handoffs` when given.
    pub fn new(
        cfg: &FleetConfig,
        config_path: PathBuf,
        count: watch::Receiver<u32>,
        handoffs: Option<Arc<Handoffs>>,
    ) -> Self {
        let command = cfg.workers.command.clone().unwrap_or_else(|| {
            let exe = std::env::current_exe().ok();
            let dir = exe
                .as_deref()
                .and_then(|p| p.parent())
                .map(PathBuf::from)
                .unwrap_or_default();
            vec![dir.join("worker").to_string_lossy().into_owned()]
        });
        Supervisor {
            config_path,
            command,
            count,
            drain_limit: cfg.workers.drain_window() + Duration::from_secs(3),
            handoffs,
        }
    }

    /// Starts worker `index`; with its handoff channel, when WebSockets are handed off.
    fn spawn(&self, index: u32) -> std::io::Result<(Child, Option<Arc<Channel>>)> {
        let id = FleetConfig::worker_id(index);
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .arg("--config")
            .arg(&self.config_path)
            .arg("--index")
            .arg(index.to_string())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The worker's end of its handoff channel, inherited under the number in the env.
        let channel = match &self.handoffs {
            Some(handoffs) => Some(handoffs.open(&id)?),
            None => None,
        };
        let inherit = channel.as_ref().map_or(-1, |(fd, _)| fd.as_raw_fd());
        if inherit >= 0 {
            cmd.env(shared::handoff::FD_ENV, inherit.to_string());
        }
        // SAFETY: prctl and fcntl are async-signal-safe. prctl asks the kernel to SIGTERM the
        // child if the balancer dies without cleaning up (kill -9), so no worker outlives it;
        // fcntl clears close-on-exec on the child's copy of its channel end only.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if inherit >= 0 && libc::fcntl(inherit, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        // The child has its copy (or failed to start); ours would keep the channel half-open.
        let channel = channel.map(|(theirs, channel)| {
            drop(theirs);
            channel
        });
        let mut child = spawned?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(prefix_lines(id.clone(), out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(prefix_lines(id, err));
        }
        Ok((child, channel))
    }

    /// Keep worker `index` running until shutdown or until it is retired; then drain it.
    async fn keep_running(&self, index: u32, mut shutdown: Shutdown, mut retire: Shutdown) {
        let id = FleetConfig::worker_id(index);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let started = Instant::now();
            let (mut child, channel) = match self.spawn(index) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(worker = %id, command = ?self.command, "cannot start worker: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => continue,
                        _ = shutdown.recv() => return,
                        _ = retire.recv() => return,
                    }
                }
            };
            tracing::info!(worker = %id, pid = child.id(), "worker started");
            let status = tokio::select! {
                s = child.wait() => s,
                _ = shutdown.recv() => return self.stop(index, child, channel).await,
                _ = retire.recv() => return self.stop(index, child, channel).await,
            };
            self.exited(index, channel);
            METRICS.restarts.with_label_values(&[id.as_str()]).inc();
            if started.elapsed() > HEALTHY_RUN {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(worker = %id, ?status, restart_in_ms = delay.as_millis() as u64, "worker exited; restarting");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.recv() => return,
                _ = retire.recv() => return,
            }
        }
    }

    /// Worker `index` is gone, and every connection handed to it with it.
    fn exited(&self, index: u32, channel: Option<Arc<Channel>>) {
        if let (Some(handoffs), Some(channel)) = (&self.handoffs, channel) {
            handoffs.close(&FleetConfig::worker_id(index), &channel);
        }
    }

    /// SIGTERM (the worker drains), then SIGKILL if it outlives its drain window.
    async fn stop(&self, index: u32, mut child: Child, channel: Option<Arc<Channel>>) {
        let id = FleetConfig::worker_id(index);
        if let Some(pid) = child.id() {
            // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        match tokio::time::timeout(self.drain_limit, child.wait()).await {
            Ok(status) => tracing::info!(worker = %id, ?status, "worker stopped"),
            Err(_) => {
                tracing::warn!(worker = %id, "worker did not finish draining in time; killing it");
                let _ = child.kill().await;
            }
        }
        self.exited(index, channel);
    }
}

#[async_trait]
impl BackgroundService for Supervisor {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut shutdown = Shutdown::from_watch(shutdown);
        let mut count = self.count.clone();
        // One retire trigger per running index; the last ones go first when the count drops.
        let mut running: Vec<ShutdownTrigger> = Vec::new();
        let mut workers = FuturesUnordered::new();
        loop {
            let want = *count.borrow_and_update();
            while (running.len() as u32) < want {
                let (retire, retired) = shared::shutdown::channel();
                let index = running.len() as u32;
                workers.push(self.keep_running(index, shutdown.clone(), retired));
                running.push(retire);
            }
            while (running.len() as u32) > want {
                let retire = running.pop().expect("more running than wanted");
                tracing::info!(worker = %FleetConfig::worker_id(running.len() as u32), "retiring worker: fleet resized");
                retire.trigger();
            }
            tokio::select! {
                changed = count.changed() => if changed.is_err() { break },
                _ = shutdown.recv() => break,
                Some(()) = workers.next(), if !workers.is_empty() => {}
            }
        }
        // Every worker sees the shutdown too: wait for them all to drain.
        while workers.next().await.is_some() {}
        // pingora would sleep out the rest of its grace period; with every worker gone there
        // is nothing left to serve or to wait for (their connections went with them).
        tracing::info!("every worker has stopped: exiting");
        std::process::exit(0);
    }
}

async fn prefix_lines(id: String, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("[{id}] {line}");
    }
}
