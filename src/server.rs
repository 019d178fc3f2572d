//! `chartbridge serve`: wires configuration, mappings, the store, the outbox worker and the HTTP
//! API together, and shuts them down in order on SIGTERM or Ctrl-C (stop accepting, finish the
//! deliveries in flight, flush the store).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::delivery::client::EhrClient;
use crate::delivery::ehr::EhrCourier;
use crate::delivery::outbox::{on_own_thread, Courier, Outbox};
use crate::delivery::webhook::WebhookCourier;
use crate::fetch::Fetch;
use crate::http::{router, AppState, Peer};
use crate::inbound::Inbox;
use crate::intake::Intake;
use crate::mapping;
use crate::metrics::Metrics;
use crate::store::{Backend, Receiver, Store};
use crate::workflow::{Ownership, Workflow, CRM, PORTAL};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("mappings: {0}")]
    Mappings(#[from] mapping::LoadError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("EHR client: {0}")]
    Client(#[from] crate::delivery::client::ClientError),
    #[error("fetched sources: {0}")]
    Fetch(crate::fetch::ConfigError),
    #[error("starting the outbox: {0}")]
    Outbox(std::io::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The workflow rules, the ownership matrix, or a mapping the matrix refuses.
    #[error("workflow:\n{}", .0.join("\n"))]
    Workflow(Vec<String>),
    #[error(transparent)]
    Webhook(#[from] crate::delivery::webhook::WebhookError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// The gateway, built and serving: its socket bound (`address`), its HTTP threads, outbox and
/// retention sweeps running. `run_until_stopped` waits for a shutdown signal and stops it
/// gracefully; tests start one in-process on port 0 the same way `serve` does.
pub struct Application {
    addr: SocketAddr,
    state: Arc<AppState>,
    store: Arc<Backend>,
    http: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
    http_stop: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    outbox: Option<std::thread::JoinHandle<()>>,
    sweeper: Option<tokio::task::JoinHandle<()>>,
    poller: Option<tokio::task::JoinHandle<()>>,
}

impl Application {
    /// Loads the mappings, opens the store, binds the socket (a port in use is an error) and
    /// starts serving, delivering and sweeping. Must be called within a tokio runtime.
    pub async fn build(config: Config) -> Result<Application, ServeError> {
        let mappings = if config.mappings_dir.is_dir() {
            mapping::load_dir(&config.mappings_dir)?
        } else {
            // Nothing to serve yet is not a reason not to start (a new deployment, a health
            // check first): every ingest route answers 404 naming the mapping it lacks.
            tracing::warn!(
                dir = %config.mappings_dir.display(),
                "no mappings directory: starting with no mappings; set mappings_dir (CHARTBRIDGE_MAPPINGS_DIR) to where the mapping files are"
            );
            Vec::new()
        };
        let workflow = Arc::new(load_workflow(&config, &mappings)?);
        let store = Arc::new(Backend::open(&config.data_dir)?);
        let metrics = Arc::new(Metrics::for_mappings(
            mappings.iter().map(|m| m.id.as_str()),
        ));
        let wake = Arc::new(Notify::new());
        let (stop, stopped) = watch::channel(false);

        let ehr = match &config.ehr {
            Some(ehr) => Some((Arc::new(EhrClient::new(ehr)?), ehr.clone())),
            None => {
                tracing::warn!(
                    "no EHR configured: submissions are accepted and held in the outbox"
                );
                None
            }
        };
        // One socket, bound here (so that a port in use is an error, not a silent share); its
        // connections are handed in turn to one single-threaded runtime per core, and a
        // connection stays on that thread from its first request to its last answer.
        let listen = config.listen;
        let listen_error = move |source| ServeError::Listen {
            addr: listen.to_string(),
            source,
        };
        let listener = std::net::TcpListener::bind(listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(listen_error)?;
        let addr = listener.local_addr().map_err(listen_error)?;
        // One outbox loop per receiver, all on the outbox's thread. The EHR's has a client of
        // its own: its connections live on the outbox's runtime.
        let mut loops: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
            Vec::new();
        if let Some((_, cfg)) = &ehr {
            let courier = EhrCourier {
                client: Arc::new(EhrClient::new(cfg)?),
                metrics: Arc::clone(&metrics),
                concurrency: cfg.concurrency,
                backoff_base: Duration::from_millis(cfg.backoff_base_ms),
                backoff_cap: Duration::from_millis(cfg.backoff_cap_ms),
                consequences: workflow.consequences(),
            };
            loops.push(Box::pin(
                outbox(&store, courier, &wake).run(stopped.clone()),
            ));
        }
        for (name, hook) in [(CRM, &config.crm), (PORTAL, &config.portal)] {
            let Some(hook) = hook else { continue };
            let receiver = Receiver::webhook(name).map_err(|e| ServeError::Workflow(vec![e]))?;
            let courier = WebhookCourier::new(receiver, hook, Arc::clone(&metrics))?;
            loops.push(Box::pin(
                outbox(&store, courier, &wake).run(stopped.clone()),
            ));
        }
        let outbox = if loops.is_empty() {
            None
        } else {
            let all = async move {
                let mut running = tokio::task::JoinSet::new();
                for l in loops {
                    running.spawn(l);
                }
                while running.join_next().await.is_some() {}
            };
            Some(on_own_thread(all).map_err(ServeError::Outbox)?)
        };
        let retention = Retention {
            bundles: config.bundle_retention(),
            audit: config.audit_retention(),
        };
        if retention.bundles.is_none() {
            tracing::info!("bundle retention is off: Bundles are kept for good");
        }
        if retention.audit.is_none() {
            tracing::info!("audit retention is off: the audit trail is kept for good");
        }
        let sweeper = (retention.bundles.is_some() || retention.audit.is_some()).then(|| {
            tokio::spawn(sweep(
                Arc::clone(&store),
                Arc::clone(&metrics),
                retention,
                stopped.clone(),
            ))
        });
        // Every mapping whose submissions nobody signs: anyone who reaches the gateway can post
        // them (said here and in `/ready`, by mapping id).
        for mapping in config.unsigned(mappings.iter().map(|m| m.id.as_str())) {
            tracing::warn!(
                mapping,
                "submissions are accepted unsigned: no [sources.<mapping id>] nor [sources.\"*\"] entry authenticates them"
            );
        }
        let operators = config.operator_keys()?;
        if operators.is_empty() {
            tracing::warn!(
                "no admin_key nor [operators]: status, provenance, patient lookups and replays are open to whoever reaches the gateway"
            );
        }
        for source in config.fetch.keys() {
            if mappings.iter().any(|m| &m.id == source) {
                tracing::info!(
                    source,
                    "its notifications are exchanged for the submission they announce"
                );
            } else {
                tracing::warn!(
                    source,
                    "a fetch is configured for a mapping that is not loaded"
                );
            }
        }
        let fetch = Fetch::new(config.fetch.clone()).map_err(ServeError::Fetch)?;

        let inbox = Arc::new(Inbox {
            store: Arc::clone(&store),
            workflow: Arc::clone(&workflow),
            ehr: ehr.as_ref().map(|(c, _)| Arc::clone(c)),
            metrics: Arc::clone(&metrics),
            wake: Arc::clone(&wake),
        });
        let poll_every = config
            .ehr
            .as_ref()
            .and_then(|e| e.events.as_ref())
            .and_then(|e| e.poll_interval_ms)
            .map(Duration::from_millis);
        let poller = match (poll_every, &inbox.ehr) {
            (Some(every), Some(_)) => {
                tracing::info!(every_ms = every.as_millis() as u64, types = ?workflow.resource_types(), "polling the EHR for what changed");
                Some(tokio::spawn(crate::inbound::poll::run(
                    Arc::clone(&inbox),
                    every,
                    stopped.clone(),
                )))
            }
            _ => None,
        };
        let state = Arc::new(AppState {
            intake: Intake::new(mappings, Arc::clone(&store), Arc::clone(&workflow)),
            inbox,
            config,
            metrics,
            outbox: wake,
            ehr: ehr.map(|(c, _)| c),
            fetch,
            started: crate::delivery::outbox::now(),
            refusals: crate::http::refusal_budget(),
            operators,
        });
        let (http_stop, http_stopped) = watch::channel(false);
        let app = router(Arc::clone(&state));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut http = Vec::with_capacity(threads);
        let mut handoffs = Vec::with_capacity(threads);
        for i in 0..threads {
            let (handoff, connections) = tokio::sync::mpsc::unbounded_channel();
            let connections = Handoff { connections };
            http.push(
                http_thread(
                    i,
                    connections,
                    app.clone(),
                    Duration::from_millis(state.config.limits.request_timeout_ms),
                    http_stopped.clone(),
                )
                .map_err(listen_error)?,
            );
            handoffs.push(handoff);
        }
        let listener = tokio::net::TcpListener::from_std(listener).map_err(listen_error)?;
        tokio::spawn(hand_out(listener, handoffs, http_stopped));
        tracing::info!(%addr, threads, mappings = state.intake.mapping_count(), pending = store.outbox_depth(&Receiver::Ehr), "listening");
        Ok(Application {
            addr,
            state,
            store,
            http,
            http_stop,
            stop,
            outbox,
            sweeper,
            poller,
        })
    }

    /// The address the socket is bound to (the port chosen, when `listen` asked for port 0).
    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// What every handler shares (the store, the mappings, the metrics).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until SIGTERM or Ctrl-C, then stops gracefully.
    pub async fn run_until_stopped(self) -> Result<(), ServeError> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` resolves, then stops: no new connections; the requests in flight
    /// are answered, then the deliveries in flight and a sweep under way finish, then the last
    /// store write is made durable.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        stop.await;
        tracing::info!("shutting down: finishing requests and deliveries in flight");
        let _ = self.http_stop.send(true);
        let mut served = Ok(());
        for thread in self.http {
            match tokio::task::spawn_blocking(move || thread.join()).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => served = Err(e),
                _ => tracing::error!("an HTTP thread ended abnormally"),
            }
        }
        let _ = self.stop.send(true);
        if let Some(outbox) = self.outbox {
            let _ = tokio::task::spawn_blocking(move || outbox.join()).await;
        }
        if let Some(sweeper) = self.sweeper {
            let _ = sweeper.await;
        }
        if let Some(poller) = self.poller {
            let _ = poller.await;
        }
        drop(self.state);
        let store = self.store;
        let flushed = tokio::task::spawn_blocking(move || store.commit()).await;
        if let Ok(Err(e)) = flushed {
            tracing::error!(error = %e, "final flush failed");
        }
        served.map_err(|source| ServeError::Listen {
            addr: self.addr.to_string(),
            source,
        })
    }
}

/// The outbox loop of one receiver.
fn outbox<C: Courier>(store: &Arc<Backend>, courier: C, wake: &Arc<Notify>) -> Outbox<C> {
    Outbox {
        store: Arc::clone(store),
        courier: Arc::new(courier),
        wake: Arc::clone(wake),
    }
}

/// The ownership matrix (configured, or the shipped one), the workflow rules (the workflows
/// directory's, or the shipped ones), and every mapping checked against the matrix: a mapping
/// that writes another system's data is not served.
pub fn load_workflow(
    config: &Config,
    mappings: &[mapping::Mapping],
) -> Result<Workflow, ServeError> {
    let ownership = match &config.ownership {
        Some(path) => Ownership::load(path)
            .map_err(|e| ServeError::Workflow(e.iter().map(ToString::to_string).collect()))?,
        None => Ownership::defaults(),
    };
    let rules = crate::workflow::rules::load_dir(&config.workflows_dir, &ownership)
        .map_err(|e| ServeError::Workflow(e.iter().map(ToString::to_string).collect()))?;
    let refused: Vec<String> = mappings
        .iter()
        .flat_map(|m| {
            ownership
                .check_mapping(m)
                .iter()
                .map(|p| crate::workflow::ownership::located(&m.file, p))
                .collect::<Vec<_>>()
        })
        .collect();
    if !refused.is_empty() {
        return Err(ServeError::Workflow(refused));
    }
    let receivers: Vec<&str> = [
        (CRM, config.crm.is_some()),
        (PORTAL, config.portal.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    Ok(Workflow::new(rules, ownership, &receivers, mappings))
}

/// Runs the gateway until a shutdown signal: built, announced on stdout, served.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let app = Application::build(config).await?;
    // The one line on stdout: what a supervisor or a test reads to find the port.
    println!(
        "{}",
        serde_json::json!({"event": "listening", "url": format!("http://{}", app.address())})
    );
    app.run_until_stopped().await
}

/// Starts HTTP thread `i`: serves `app` on the connections handed to it until `stop` turns
/// true, then lets each connection finish the request it is serving (graceful) and returns.
/// A client that has not sent a request's headers within `header_timeout` of starting it is
/// cut off (hyper's header timer; `axum::serve` runs without one).
fn http_thread(
    i: usize,
    mut connections: Handoff,
    app: axum::Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("http-{i}"))
        .spawn(move || {
            runtime.block_on(async move {
                let mut served = tokio::task::JoinSet::new();
                loop {
                    let (stream, peer) = tokio::select! {
                        next = connections.next() => match next {
                            Some(connection) => connection,
                            None => break,
                        },
                        _ = stop.wait_for(|s| *s) => break,
                    };
                    served.spawn(serve_connection(
                        stream,
                        peer,
                        app.clone(),
                        header_timeout,
                        stop.clone(),
                    ));
                    // Reap what has finished, so the set holds open connections only.
                    while served.try_join_next().is_some() {}
                }
                while served.join_next().await.is_some() {}
                Ok(())
            })
        })
}

/// One connection: HTTP/1.1 requests to `app` (each knowing the peer) until the client closes
/// it, it times out, or `stop` turns true (then the request in flight is finished first).
async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    use tower::ServiceExt;
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(Peer(peer)));
            app.clone().oneshot(req.map(axum::body::Body::new))
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        // Its end, or its error (a client gone, a timeout): nothing to answer any more.
        _ = connection.as_mut() => return,
        _ = stop.wait_for(|s| *s) => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// Accepts connections and hands them to the HTTP threads in turn, until `stop` turns true
/// (then the socket closes). With every thread accepting from the socket itself, whichever
/// woke first took a whole burst of connections, and one thread served them all while the
/// others idled.
async fn hand_out(
    mut listener: tokio::net::TcpListener,
    threads: Vec<UnboundedSender<Connection>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut turns = threads.iter().cycle();
    loop {
        // axum's accept: retries what a peer caused, waits out what the process ran out of.
        let (stream, peer) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        // Off this runtime's reactor, onto the thread's that serves it.
        match stream.into_std() {
            Ok(stream) => {
                if let Some(thread) = turns.next() {
                    let _ = thread.send((stream, peer));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand over a connection"),
        }
    }
}

type Connection = (std::net::TcpStream, SocketAddr);

/// An HTTP thread's connections, as the acceptor hands them over.
struct Handoff {
    connections: UnboundedReceiver<Connection>,
}

impl Handoff {
    /// The next connection, on this thread's reactor; `None` once the acceptor has stopped.
    async fn next(&mut self) -> Option<(tokio::net::TcpStream, SocketAddr)> {
        loop {
            let (stream, peer) = self.connections.recv().await?;
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => return Some((stream, peer)),
                Err(e) => tracing::warn!(error = %e, "cannot take over a connection"),
            }
        }
    }
}

/// How often the store is swept for what is past its retention (the first time at start).
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// How long the store keeps what it may drop; `None`: for good.
#[derive(Debug, Clone, Copy)]
struct Retention {
    /// Delivered submissions' Bundles (PHI).
    bundles: Option<Duration>,
    /// Operators' accesses.
    audit: Option<Duration>,
}

/// Sweeps the Bundle log and the audit trail now and every `SWEEP_EVERY` until `stopped` (a
/// sweep under way finishes first).
async fn sweep(
    store: Arc<Backend>,
    metrics: Arc<Metrics>,
    retention: Retention,
    mut stopped: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopped.changed() => return,
        }
        if let Some(retention) = retention.bundles {
            let (store, now) = (Arc::clone(&store), std::time::SystemTime::now());
            match tokio::task::spawn_blocking(move || store.sweep_bundles(retention, now)).await {
                Ok(Ok(swept)) => {
                    Metrics::add(&metrics.bundles_expired, swept.expired as u64);
                    Metrics::add(&metrics.bundles_moved, swept.moved as u64);
                    Metrics::add(&metrics.bundle_segments_deleted, swept.segments as u64);
                    if swept.segments > 0 {
                        tracing::info!(
                            segments = swept.segments,
                            expired = swept.expired,
                            moved = swept.moved,
                            "bundle log swept"
                        );
                    }
                }
                Ok(Err(e)) => tracing::error!(error = %e, "bundle sweep failed"),
                Err(_) => tracing::error!("the bundle sweep ended abnormally"),
            }
        }
        if let Some(retention) = retention.audit {
            let (store, now) = (Arc::clone(&store), std::time::SystemTime::now());
            match tokio::task::spawn_blocking(move || store.forget_accesses(retention, now)).await {
                Ok(Ok(forgotten)) => {
                    Metrics::add(&metrics.audit_entries_forgotten, forgotten as u64);
                    if forgotten > 0 {
                        tracing::info!(forgotten, "audit trail swept");
                    }
                }
                Ok(Err(e)) => tracing::error!(error = %e, "audit sweep failed"),
                Err(_) => tracing::error!("the audit sweep ended abnormally"),
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_handed_to_the_threads_in_turn_and_the_socket_closes_on_stop() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (first, mut to_first) = tokio::sync::mpsc::unbounded_channel();
        let (second, mut to_second) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let acceptor = tokio::spawn(hand_out(listener, vec![first, second], stopped));

        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        for thread in [&mut to_first, &mut to_second] {
            for _ in 0..2 {
                let handed = tokio::time::timeout(Duration::from_secs(5), thread.recv());
                let (stream, peer) = handed.await.unwrap().unwrap();
                assert_eq!(stream.local_addr().unwrap(), addr);
                assert!(clients.iter().any(|c| c.local_addr().unwrap() == peer));
            }
        }
        assert!(to_first.try_recv().is_err() && to_second.try_recv().is_err());

        stop.send(true).unwrap();
        acceptor.await.unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
