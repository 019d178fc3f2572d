//! The gateway as a library: `Application::build` in the test's own process, on port 0, with
//! the real FHIR server as its EHR and a CRM receiver; the address known before it serves, a
//! submission charted and announced, then a graceful stop.

use serde_json::json;

use super::common::{root, FhirServer};
use super::receiver::WebhookReceiver;
use chartbridge::config::{Config, EhrConfig, WebhookConfig};
use chartbridge::server::Application;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_in_process_on_port_0() {
    let ehr = tokio::task::spawn_blocking(FhirServer::start)
        .await
        .unwrap();
    let crm = tokio::task::spawn_blocking(WebhookReceiver::crm)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut ehr_config: EhrConfig = toml::from_str(&format!("base_url = \"{}\"", ehr.url)).unwrap();
    ehr_config.backoff_base_ms = 50;
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        mappings_dir: root().join("mappings"),
        ehr: Some(ehr_config),
        crm: Some(WebhookConfig {
            url: crm.url.clone(),
            secret: super::receiver::CRM_SECRET.into(),
            concurrency: 2,
            backoff_base_ms: 50,
            backoff_cap_ms: 200,
            max_attempts: 5,
            timeout_ms: 3000,
        }),
        ..Config::default()
    };
    let app = Application::build(config).await.unwrap();
    let url = format!("http://{}", app.address());
    assert_ne!(app.address().port(), 0);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));

    let mut body = super::common::read_json(
        &root().join("fixtures/refill-request-portal/complete.input.json"),
    );
    body["request_id"] = json!("rf_in_process");
    let answer = reqwest::Client::new()
        .post(format!("{url}/submissions/refill-request-portal"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let events = tokio::task::spawn_blocking(move || {
        let events = crm.wait_for(2);
        (events, crm)
    })
    .await
    .unwrap();
    let kinds: Vec<&str> = events.0.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["refill.requested", "intake.charted"]);
    assert!(events.1.invalid().is_empty(), "{:?}", events.1.invalid());

    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
    // The receiver and the FHIR server block as they stop: not on this runtime's threads.
    tokio::task::spawn_blocking(move || drop((events, ehr)))
        .await
        .unwrap();
}
