//! `chartbridge serve`: wires configuration, mappings, the store, the outbox worker and the HTTP
//! API together, and shuts them down in order on SIGTERM or Ctrl-C (stop accepting, finish the
//! deliveries in flight, flush the store).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::delivery::client::EhrClient;
use crate::delivery::outbox::Outbox;
use crate::http::{router, AppState};
use crate::intake::Intake;
use crate::mapping;
use crate::metrics::Metrics;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("mappings: {0}")]
    Mappings(#[from] mapping::LoadError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("EHR client: {0}")]
    Client(#[from] crate::delivery::client::ClientError),
    #[error("starting the outbox: {0}")]
    Outbox(std::io::Error),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// Runs the gateway until a shutdown signal.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let mappings = mapping::load_dir(&config.mappings_dir)?;
    let store = Arc::new(Store::open(&config.data_dir)?);
    let metrics = Arc::new(Metrics::default());
    let wake = Arc::new(Notify::new());
    let (stop, stopped) = watch::channel(false);

    let ehr = match &config.ehr {
        Some(ehr) => Some((Arc::new(EhrClient::new(ehr)?), ehr.clone())),
        None => {
            tracing::warn!("no EHR configured: submissions are accepted and held in the outbox");
            None
        }
    };
    // One socket, bound here (so that a port in use is an error, not a silent share), served by
    // one single-threaded runtime per core: a connection stays on the thread that accepted it,
    // from its first request to its last answer.
    let listen = config.listen;
    let listen_error = move |source| ServeError::Listen {
        addr: listen.to_string(),
        source,
    };
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(listen_error)?;
    let addr = listener.local_addr().map_err(listen_error)?;
    // The outbox has a client of its own: its connections live on the outbox's runtime.
    let worker = match &ehr {
        Some((_, cfg)) => Some(
            Outbox {
                store: Arc::clone(&store),
                client: Arc::new(EhrClient::new(cfg)?),
                wake: Arc::clone(&wake),
                metrics: Arc::clone(&metrics),
                concurrency: cfg.concurrency,
                backoff_base: Duration::from_millis(cfg.backoff_base_ms),
                backoff_cap: Duration::from_millis(cfg.backoff_cap_ms),
            }
            .spawn(stopped)
            .map_err(ServeError::Outbox)?,
        ),
        None => None,
    };
    for (source, auth) in &config.sources {
        if matches!(auth, crate::config::SourceAuth::None) {
            tracing::warn!(source, "source authentication is off");
        }
    }

    let state = Arc::new(AppState {
        intake: Intake::new(mappings, Arc::clone(&store)),
        config,
        metrics,
        outbox: wake,
        ehr: ehr.map(|(c, _)| c),
    });
    let (http_stop, http_stopped) = watch::channel(false);
    let app = router(Arc::clone(&state));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut http = Vec::with_capacity(threads);
    for i in 0..threads {
        let listener = listener.try_clone().map_err(listen_error)?;
        http.push(
            http_thread(i, listener, app.clone(), http_stopped.clone()).map_err(listen_error)?,
        );
    }
    drop(listener);
    tracing::info!(%addr, threads, mappings = state.intake.mapping_count(), pending = store.outbox_depth(), "listening");
    // The one line on stdout: what a supervisor or a test reads to find the port.
    println!(
        "{}",
        serde_json::json!({"event": "listening", "url": format!("http://{addr}")})
    );

    shutdown_signal().await;
    tracing::info!("shutting down: finishing requests and deliveries in flight");
    let _ = http_stop.send(true);
    let mut served = Ok(());
    for thread in http {
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => served = Err(e),
            _ => tracing::error!("an HTTP thread ended abnormally"),
        }
    }
    let _ = stop.send(true);
    if let Some(worker) = worker {
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    }
    let flushed = tokio::task::spawn_blocking(move || store.commit()).await;
    if let Ok(Err(e)) = flushed {
        tracing::error!(error = %e, "final flush failed");
    }
    served.map_err(|source| ServeError::Listen {
        addr: addr.to_string(),
        source,
    })
}

/// Starts HTTP thread `i`: serves `app` on its copy of the listening socket until `stop` turns
/// true.
fn http_thread(
    i: usize,
    listener: std::net::TcpListener,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("http-{i}"))
        .spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
            })
        })
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
