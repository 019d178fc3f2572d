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
    let worker = ehr.as_ref().map(|(client, cfg)| {
        let outbox = Outbox {
            store: Arc::clone(&store),
            client: Arc::clone(client),
            wake: Arc::clone(&wake),
            metrics: Arc::clone(&metrics),
            concurrency: cfg.concurrency,
            backoff_base: Duration::from_millis(cfg.backoff_base_ms),
            backoff_cap: Duration::from_millis(cfg.backoff_cap_ms),
        };
        tokio::spawn(outbox.run(stopped))
    });
    for (source, auth) in &config.sources {
        if matches!(auth, crate::config::SourceAuth::None) {
            tracing::warn!(source, "source authentication is off");
        }
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: config.listen.to_string(),
        source,
    })?;
    let state = Arc::new(AppState {
        intake: Intake::new(mappings, Arc::clone(&store)),
        config,
        metrics,
        outbox: wake,
        ehr: ehr.map(|(c, _)| c),
    });
    tracing::info!(%addr, mappings = state.intake.mapping_count(), pending = store.outbox_depth(), "listening");
    // The one line on stdout: what a supervisor or a test reads to find the port.
    println!(
        "{}",
        serde_json::json!({"event": "listening", "url": format!("http://{addr}")})
    );

    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    tracing::info!("shutting down: finishing deliveries in flight");
    let _ = stop.send(true);
    if let Some(worker) = worker {
        let _ = worker.await;
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
