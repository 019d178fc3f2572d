//! The configuration as operators write it: the README's example, defaults, environment
//! overrides, and what is refused.

use super::*;

/// The README's example configuration is a configuration this version reads.
#[test]
fn the_readme_example_reads() {
    let readme = include_str!("../../README.md");
    let start = readme.find("```toml\n").unwrap() + "```toml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let c: Config = toml::from_str(&readme[start..end]).unwrap();
    assert_eq!(c.operator_keys().unwrap().len(), 3, "admin key, alice, bob");
    assert!(matches!(
        c.fetch.get("glp1-intake-healthie"),
        Some(FetchSource::HealthieGraphql { url, timeout_ms: 10_000, .. })
            if url == "https://api.gethealthie.com/graphql"
    ));
    assert!(matches!(
        c.fetch.get("weight-checkin-portal"),
        Some(FetchSource::Http { auth: FetchAuth::Oauth2ClientCredentials { .. }, id, .. })
            if id == "$.data.response_id"
    ));
    assert_eq!(c.crm.as_ref().map(|h| h.max_attempts), Some(50));
    assert!(c.portal.is_some());
    assert!(c.ehr.as_ref().and_then(|e| e.events.as_ref()).is_some());
    c.check_events().unwrap();
    assert!(
        toml::from_str::<Config>("[fetch.x]\ntype = \"healthie_graphql\"\nurl = \"u\"\n").is_err(),
        "an api_key is required"
    );
}

#[test]
fn file_then_environment() {
    let mut c: Config = toml::from_str(
        r#"
        listen = "127.0.0.1:9000"
        [ehr]
        base_url = "http://ehr/fhir"
        auth = { type = "bearer", token = "t" }
        [sources.glp1-intake-typeform]
        type = "hmac"
        header = "typeform-signature"
        prefix = "sha256="
        secret = "s3cret"
        [sources."*"]
        type = "api_key"
        key = "k"
        "#,
    )
    .unwrap();
    assert!(matches!(
        c.source_auth("glp1-intake-typeform"),
        SourceAuth::Hmac { .. }
    ));
    assert!(
        matches!(c.source_auth("other"), SourceAuth::ApiKey { header, .. } if header == "x-api-key")
    );
    c.apply_env(|n| (n == "CHARTBRIDGE_EHR_URL").then(|| "http://other/fhir".to_string()))
        .unwrap();
    assert_eq!(c.ehr.as_ref().unwrap().base_url, "http://other/fhir");
    assert_eq!(c.listen.port(), 9000);
    assert_eq!(c.bundle_retention_days, 30);
    c.apply_env(|n| (n == "CHARTBRIDGE_BUNDLE_RETENTION_DAYS").then(|| "0".to_string()))
        .unwrap();
    assert_eq!(c.bundle_retention(), None, "0 keeps Bundles for good");
    assert_eq!(c.admin_key, None);
    c.apply_env(|n| (n == "CHARTBRIDGE_ADMIN_KEY").then(|| "k3y".to_string()))
        .unwrap();
    assert_eq!(c.admin_key.as_deref(), Some("k3y"));
    c.apply_env(|n| (n == "CHARTBRIDGE_ADMIN_KEY").then(String::new))
        .unwrap();
    assert_eq!(c.admin_key, None, "empty: no key");
    assert!(c
        .apply_env(|n| (n == "CHARTBRIDGE_BUNDLE_RETENTION_DAYS").then(|| "a week".into()))
        .is_err());
    assert_eq!(
        c.audit_retention(),
        None,
        "the audit trail is kept for good"
    );
    c.apply_env(|n| (n == "CHARTBRIDGE_AUDIT_RETENTION_DAYS").then(|| "2190".to_string()))
        .unwrap();
    assert_eq!(
        c.audit_retention(),
        Some(std::time::Duration::from_secs(2190 * 86_400))
    );
    assert!(
        toml::from_str::<Config>("lisen = 1").is_err(),
        "typos are errors"
    );
}

#[test]
fn a_transaction_limit_is_a_positive_number_for_transaction_mode() {
    let ehr = |extra: &str| {
        toml::from_str::<Config>(&format!("[ehr]\nbase_url = \"http://ehr\"\n{extra}"))
    };
    let c = ehr("max_transaction_entries = 8").unwrap();
    assert_eq!(
        c.ehr.as_ref().and_then(|e| e.max_transaction_entries),
        std::num::NonZeroUsize::new(8)
    );
    assert!(c.check_ehr().is_ok());
    assert!(ehr("")
        .unwrap()
        .ehr
        .unwrap()
        .max_transaction_entries
        .is_none());
    let zero = ehr("max_transaction_entries = 0").unwrap_err().to_string();
    assert!(zero.contains("max_transaction_entries"), "{zero}");
    let per_resource = ehr("mode = \"per_resource\"\nmax_transaction_entries = 8").unwrap();
    let refused = per_resource.check_ehr().unwrap_err().to_string();
    assert!(
        refused.starts_with("[ehr] max_transaction_entries"),
        "{refused}"
    );
}

/// Each operator a key of their own, named in the audit trail; a key shared or empty is
/// refused (the trail could not tell who it was).
#[test]
fn operators_have_keys_of_their_own() {
    let c: Config = toml::from_str(
        "admin_key = \"root-key\"\n[operators]\nalice = \"alice-key\"\nbob = \"bob-key\"\n",
    )
    .unwrap();
    let keys = c.operator_keys().unwrap();
    let who: Vec<&str> = keys.iter().map(|(w, _)| w.as_str()).collect();
    let root = crate::fhir::sha256_hex(b"root-key");
    assert_eq!(
        who,
        [
            format!("admin key {}", &root[..16]).as_str(),
            "operator alice",
            "operator bob"
        ]
    );
    // A key given by its digest is the same key (and the same fingerprint).
    let hashed: Config =
        toml::from_str(&format!("admin_key = \"sha256:{}\"\n", root.to_uppercase())).unwrap();
    assert_eq!(hashed.operator_keys().unwrap(), keys[..1]);
    let hashed_and_plain =
        format!("admin_key = \"sha256:{root}\"\n[operators]\nbob = \"root-key\"\n");
    for (bad, why) in [
        (
            "admin_key = \"k\"\n[operators]\nbob = \"k\"\n",
            "the same key as admin key",
        ),
        (
            "[operators]\nal = \"k\"\nbob = \"k\"\n",
            "bob: the same key as operator al",
        ),
        ("[operators]\nbob = \" \"\n", "bob: the key is empty"),
        (
            "[operators]\nbob = \"sha256:k\"\n",
            "bob: `sha256:` must be followed by the key's SHA-256",
        ),
        (hashed_and_plain.as_str(), "bob: the same key as admin key"),
    ] {
        let c: Config = toml::from_str(bad).unwrap();
        let e = c.operator_keys().unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
        assert!(!e.contains("\"k\""), "the key is not in the message: {e}");
    }
    assert!(Config::default().operator_keys().unwrap().is_empty());
}

#[test]
fn receivers_and_senders_need_real_credentials() {
    let read = |text: &str| -> Result<(), String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check_events().map_err(|e| e.to_string())
    };
    let hook = |secret: &str| format!("[crm]\nurl = \"http://crm\"\nsecret = \"{secret}\"\n");
    assert_eq!(
        read(&hook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
        Ok(())
    );
    assert!(read(&hook("hunter2!"))
        .unwrap_err()
        .contains("[crm] secret"));
    let ehr = "[ehr]\nbase_url = \"http://ehr\"\n[ehr.events]\nauth = { type = \"bearer\", token = \"\" }\n";
    assert!(read(ehr)
        .unwrap_err()
        .contains("[ehr.events]: the credential is empty"));
    let medplum = "[ehr]\nbase_url = \"http://ehr\"\n[ehr.events]\nauth = { type = \"hmac\", secret = \"s\" }\npoll_interval_ms = 30000\n";
    assert_eq!(read(medplum), Ok(()));
    let c: Config = toml::from_str(medplum).unwrap();
    let events = c.ehr.unwrap().events.unwrap();
    assert!(
        matches!(events.auth, EventsAuth::Hmac { ref header, encoding: SignatureEncoding::Hex, .. } if header == "x-signature")
    );
    assert!(read("[events.Portal]\ntype = \"bearer\"\ntoken = \"t\"\n")
        .unwrap_err()
        .contains("a sender's name"));
}

#[test]
fn defaults_run_without_configuration() {
    let c = Config::default();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert!(c.ehr.is_none());
    assert!(matches!(c.source_auth("x"), SourceAuth::None));
    assert_eq!(
        c.bundle_retention(),
        Some(std::time::Duration::from_secs(30 * 86_400))
    );
    assert!(!c.echo_route, "the bench's route is off unless asked for");
}
