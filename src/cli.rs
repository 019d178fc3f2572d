//! The command line: `serve`, `check`, `map`, `test`, `questionnaire`, `inspect`, `patient`,
//! `replay`. Thin: parses arguments, calls the library, prints, and turns results into exit
//! codes (0 ok, 1 problems found, 2 usage or I/O).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::fhir::validate::validate;
use crate::golden::{self, CaseOutcome};
use crate::mapping::{self, LoadError, Mapping, PayloadError, SubmissionInput};

#[derive(Debug, Parser)]
#[command(
    name = "chartbridge",
    version,
    about = "FHIR-native mapping gateway for intake forms"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lint mapping files (a file or a directory), the workflow rules and the ownership matrix:
    /// every problem with file:line. A mapping that writes another system's data is refused.
    Check {
        #[arg(default_value = "mappings")]
        paths: Vec<PathBuf>,
        /// The workflow rules' directory (`*.yaml`); absent or empty: the shipped rules.
        #[arg(long, default_value = "workflows")]
        workflows: PathBuf,
        /// The ownership matrix; default: `ownership.yaml` if there is one, else the shipped one.
        #[arg(long)]
        ownership: Option<PathBuf>,
    },
    /// Dry-run a payload through a mapping and print the transaction Bundle.
    Map {
        /// A mapping file, or a mapping id found in --mappings.
        #[arg(long, short)]
        mapping: String,
        /// Directory searched when --mapping is an id.
        #[arg(long, default_value = "mappings")]
        mappings: PathBuf,
        /// The payload (JSON); `-` reads standard input.
        payload: PathBuf,
        /// Receive time (FHIR instant) used for `issued` and `recorded`; default: now.
        #[arg(long)]
        received_at: Option<String>,
        /// Print flags, missing answers and the Bundle instead of the Bundle alone.
        #[arg(long)]
        report: bool,
    },
    /// Run golden fixtures: fixtures/<mapping-id>/<case>.input.json → <case>.expected.json.
    Test {
        #[arg(default_value = "mappings")]
        mappings: PathBuf,
        #[arg(long, default_value = "fixtures")]
        fixtures: PathBuf,
        /// Write the actual output as the new expected files.
        #[arg(long)]
        update: bool,
    },
    /// Run the gateway (HTTP API, store, outbox).
    Serve {
        /// TOML configuration; `CHARTBRIDGE_*` environment variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show a submission's status, transitions and EHR references (asks the running gateway,
    /// with the admin key of `CHARTBRIDGE_ADMIN_KEY` if it is set).
    Inspect {
        /// `<mapping id>/<submission id>`
        key: String,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// List a patient's submissions, by the identifier their mapping recorded (asks the running
    /// gateway, with `CHARTBRIDGE_ADMIN_KEY` as inspect does).
    Patient {
        /// `<identifier system>|<value>`, e.g. `https://crm.example-clinic.com/patient|pt_8f3c2a91`
        identifier: String,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// List the dead-lettered submissions (latest first, with the EHR's reason), or with
    /// `--waiting` what the outbox holds (oldest first) — asks the running gateway, with
    /// `CHARTBRIDGE_ADMIN_KEY` as inspect does.
    DeadLetters {
        /// The deliveries waiting in the outbox instead.
        #[arg(long)]
        waiting: bool,
        /// Only this mapping's.
        #[arg(long)]
        mapping: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Go on from a page's `next`.
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Show who used the operators' endpoints, newest first (asks the running gateway, with
    /// `CHARTBRIDGE_ADMIN_KEY` as inspect does).
    Audit {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Recorded at or after this instant (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Recorded before this instant (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Go on from a page's `next`.
        #[arg(long)]
        before: Option<String>,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Deliver a submission again, e.g. after a dead letter's cause was fixed.
    Replay {
        /// `<mapping id>/<submission id>`
        #[arg(required_unless_present = "dead_lettered")]
        key: Option<String>,
        /// Every dead letter instead, earliest first (after the cause the EHR named is fixed).
        #[arg(long, conflicts_with = "key")]
        dead_lettered: bool,
        /// With --dead-lettered: only this mapping's.
        #[arg(long, requires = "dead_lettered")]
        mapping: Option<String>,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// SDC observation-based extraction, as `POST /QuestionnaireResponse/$extract` does it:
    /// print the transaction Bundle of Observations (what could not be extracted: on stderr).
    Extract {
        /// The Questionnaire: a JSON file, or a mapping (file or id in --mappings) whose
        /// Questionnaire it is.
        #[arg(long, short)]
        questionnaire: String,
        #[arg(long, default_value = "mappings")]
        mappings: PathBuf,
        /// The QuestionnaireResponse (JSON); `-` reads standard input.
        response: PathBuf,
    },
    /// Print the FHIR Questionnaire a mapping defines.
    Questionnaire {
        /// A mapping file, or a mapping id found in --mappings.
        mapping: String,
        #[arg(long, default_value = "mappings")]
        mappings: PathBuf,
    },
}

/// Runs the CLI with the process arguments.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Check {
            paths,
            workflows,
            ownership,
        } => check(&paths, &workflows, ownership.as_deref()),
        Command::Map {
            mapping,
            mappings,
            payload,
            received_at,
            report,
        } => map(&mapping, &mappings, &payload, received_at, report),
        Command::Test {
            mappings,
            fixtures,
            update,
        } => test(&mappings, &fixtures, update),
        Command::Serve { config } => serve(config.as_deref()),
        Command::Inspect { key, url } => remote(
            reqwest::Method::GET,
            &format!("{url}/submissions/{key}"),
            &[],
        ),
        Command::Patient { identifier, url } => remote(
            reqwest::Method::GET,
            &format!("{url}/submissions"),
            &[("patient", &identifier)],
        ),
        Command::DeadLetters {
            waiting,
            mapping,
            limit,
            after,
            url,
        } => {
            let limit = limit.to_string();
            let state = if waiting { "waiting" } else { "dead-lettered" };
            let query = with_given(
                &[("state", state), ("limit", &limit)],
                &[("mapping", &mapping), ("after", &after)],
            );
            remote(reqwest::Method::GET, &format!("{url}/submissions"), &query)
        }
        Command::Audit {
            limit,
            since,
            until,
            before,
            url,
        } => {
            let limit = limit.to_string();
            let query = with_given(
                &[("limit", &limit)],
                &[("since", &since), ("until", &until), ("before", &before)],
            );
            remote(reqwest::Method::GET, &format!("{url}/audit"), &query)
        }
        Command::Replay {
            key: Some(key),
            url,
            ..
        } => remote(
            reqwest::Method::POST,
            &format!("{url}/submissions/{key}/replay"),
            &[],
        ),
        Command::Replay {
            key: None,
            mapping,
            url,
            ..
        } => remote(
            reqwest::Method::POST,
            &format!("{url}/dead-letters/replay"),
            &with_given(&[], &[("mapping", &mapping)]),
        ),
        Command::Extract {
            questionnaire,
            mappings,
            response,
        } => extract(&questionnaire, &mappings, &response),
        Command::Questionnaire { mapping, mappings } => match find(&mapping, &mappings) {
            Ok(m) => {
                print_json(&m.questionnaire());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}

/// A query of the parameters always sent and of the optional ones given.
fn with_given<'a>(
    always: &[(&'a str, &'a str)],
    optional: &[(&'a str, &'a Option<String>)],
) -> Vec<(&'a str, &'a str)> {
    let given = optional
        .iter()
        .filter_map(|(name, v)| Some((*name, v.as_deref()?)));
    always.iter().copied().chain(given).collect()
}

/// Prints a JSON document on standard output. A reader that goes away early (`| head`) is
/// not an error: what it did not read is simply not written.
fn print_json(v: &Value) {
    out(&serde_json::to_string_pretty(v).unwrap_or_default());
}

/// One line on standard output, quietly dropped when the reader has gone (a broken pipe).
fn out(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn load(path: &Path) -> Result<Vec<Mapping>, LoadError> {
    if path.is_dir() {
        mapping::load_dir(path)
    } else {
        mapping::load_file(path).map(|m| vec![m])
    }
}

/// Reports a load error; the exit code says whether it was the files' fault (1) or I/O (2).
fn report_load_error(e: &LoadError) -> ExitCode {
    eprintln!("{e}");
    match e {
        LoadError::Io { .. } => ExitCode::from(2),
        LoadError::Invalid(errors) => {
            eprintln!("{} problem(s) found", errors.len());
            ExitCode::from(1)
        }
    }
}

fn find(name: &str, dir: &Path) -> Result<Mapping, ExitCode> {
    let path = Path::new(name);
    if path.is_file() {
        return mapping::load_file(path).map_err(|e| report_load_error(&e));
    }
    let all = mapping::load_dir(dir).map_err(|e| report_load_error(&e))?;
    all.into_iter().find(|m| m.id == name).ok_or_else(|| {
        eprintln!(
            "no mapping `{name}`: not a file, and no mapping with that id in {}",
            dir.display()
        );
        ExitCode::from(2)
    })
}

fn check(paths: &[PathBuf], workflows: &Path, ownership: Option<&Path>) -> ExitCode {
    let mut problems = 0usize;
    let mut ok = 0usize;
    let default_matrix = Path::new("ownership.yaml");
    let matrix = match ownership.or(default_matrix.is_file().then_some(default_matrix)) {
        Some(path) => match crate::workflow::Ownership::load(path) {
            Ok(o) => o,
            Err(errors) => {
                for e in &errors {
                    eprintln!("{e}");
                }
                eprintln!("{} problem(s) found", errors.len());
                return ExitCode::from(1);
            }
        },
        None => crate::workflow::Ownership::defaults(),
    };
    match crate::workflow::rules::load_dir(workflows, &matrix) {
        Ok(rules) => eprintln!(
            "{} workflow rule(s) ok ({})",
            rules.len(),
            if workflows.is_dir() {
                workflows.display().to_string()
            } else {
                "shipped".to_string()
            }
        ),
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            problems += errors.len();
        }
    }
    for path in paths {
        match load(path) {
            Ok(ms) => {
                for m in ms {
                    for note in m.notes() {
                        eprintln!("{}: note: {note}", m.file.display());
                    }
                    let owned = matrix.check_mapping(&m);
                    for p in &owned {
                        eprintln!("{}", crate::workflow::ownership::located(&m.file, p));
                    }
                    if !owned.is_empty() {
                        problems += owned.len();
                        continue;
                    }
                    // The generated Questionnaire must itself be valid FHIR.
                    match validate(&m.questionnaire()) {
                        Ok(()) => ok += 1,
                        Err(oo) => {
                            problems += 1;
                            for i in oo.issues {
                                eprintln!("{}: generated Questionnaire: {i}", m.file.display());
                            }
                        }
                    }
                }
            }
            Err(LoadError::Invalid(errors)) => {
                for e in &errors {
                    eprintln!("{e}");
                }
                problems += errors.len();
            }
            Err(e) => return report_load_error(&e),
        }
    }
    if problems > 0 {
        eprintln!("{problems} problem(s) found");
        ExitCode::from(1)
    } else {
        eprintln!("{ok} mapping(s) ok");
        ExitCode::SUCCESS
    }
}

fn map(
    name: &str,
    dir: &Path,
    payload: &Path,
    received_at: Option<String>,
    report: bool,
) -> ExitCode {
    let m = match find(name, dir) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let raw = match read_input(payload) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let parsed = match m.parse_payload(&raw) {
        Ok(v) => v,
        Err(e) => {
            let oo = crate::fhir::OperationOutcome::new(vec![crate::fhir::Issue::error(
                "structure",
                match &e {
                    PayloadError::NotJson { .. } => format!("the payload is {e}"),
                    other => format!("the payload cannot be read: {other}"),
                },
            )]);
            print_json(&oo.to_json());
            return ExitCode::from(1);
        }
    };
    if let Err(why) = m.accepts(&parsed) {
        print_json(&serde_json::json!({ "ignored": why }));
        return ExitCode::SUCCESS;
    }
    let received_at = received_at
        .unwrap_or_else(|| chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    match m.map_submission(SubmissionInput {
        payload: &parsed,
        raw: &raw,
        received_at: &received_at,
    }) {
        Ok(mapped) => {
            for w in &mapped.warnings {
                eprintln!("{w}");
            }
            if report {
                print_json(&serde_json::to_value(&mapped).unwrap_or_default());
            } else {
                print_json(&mapped.bundle_json().unwrap_or_default());
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            print_json(&failure.outcome().to_json());
            ExitCode::from(1)
        }
    }
}

fn extract(questionnaire: &str, mappings: &Path, response: &Path) -> ExitCode {
    let q = if questionnaire.ends_with(".json") {
        match read_input(Path::new(questionnaire)).and_then(|raw| parse_json(questionnaire, &raw)) {
            Ok(q) => q,
            Err(code) => return code,
        }
    } else {
        match find(questionnaire, mappings) {
            Ok(m) => m.questionnaire(),
            Err(code) => return code,
        }
    };
    let qr = match read_input(response)
        .and_then(|raw| parse_json(&response.display().to_string(), &raw))
    {
        Ok(qr) => qr,
        Err(code) => return code,
    };
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    match mapping::extract::extract(&q, &qr, &now) {
        Ok(out) => {
            for issue in &out.issues {
                match issue.expression.first() {
                    Some(at) => eprintln!("{} at {at}: {}", issue.code, issue.diagnostics),
                    None => eprintln!("{}: {}", issue.code, issue.diagnostics),
                }
            }
            print_json(&out.bundle);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// A file's bytes, or standard input's for `-`.
fn read_input(path: &Path) -> Result<Vec<u8>, ExitCode> {
    let raw = if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map(|_| buf)
    } else {
        std::fs::read(path)
    };
    raw.map_err(|e| {
        eprintln!("{}: {e}", path.display());
        ExitCode::from(2)
    })
}

fn parse_json(name: &str, raw: &[u8]) -> Result<Value, ExitCode> {
    serde_json::from_slice(raw).map_err(|e| {
        eprintln!("{name}: not JSON: {e}");
        ExitCode::from(2)
    })
}

fn test(mappings: &Path, fixtures: &Path, update: bool) -> ExitCode {
    let ms = match load(mappings) {
        Ok(ms) => ms,
        Err(e) => return report_load_error(&e),
    };
    let reports = golden::run(&ms, fixtures, update);
    let (mut passed, mut failed, mut io) = (0, 0, 0);
    for r in &reports {
        let name = r.input.display();
        match &r.outcome {
            CaseOutcome::Passed => passed += 1,
            CaseOutcome::Updated => {
                passed += 1;
                eprintln!("updated  {}", golden::expected_path(&r.input).display());
            }
            CaseOutcome::Mismatch(diffs) => {
                failed += 1;
                eprintln!("FAILED   {name}");
                for d in diffs {
                    eprintln!("    {d}");
                }
            }
            CaseOutcome::Invalid(why) => {
                failed += 1;
                eprintln!("INVALID  {name}: the Bundle is not valid FHIR R4: {why}");
            }
            CaseOutcome::Io(why) => {
                io += 1;
                eprintln!("ERROR    {name}: {why}");
            }
        }
    }
    let without: Vec<&str> = ms
        .iter()
        .filter(|m| !reports.iter().any(|r| r.mapping_id == m.id))
        .map(|m| m.id.as_str())
        .collect();
    if !without.is_empty() {
        eprintln!("no fixtures for: {}", without.join(", "));
    }
    out(&format!("golden: {passed} passed, {failed} failed"));
    if io > 0 {
        ExitCode::from(2)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn serve(config: Option<&Path>) -> ExitCode {
    crate::logging::init();
    let config = match crate::config::Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Only waits for signals and threads: HTTP and the outbox have runtimes of their own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(crate::server::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// `inspect`, `patient` and `replay`: one request to the running gateway, its JSON answer
/// printed; with the admin key of `CHARTBRIDGE_ADMIN_KEY` when it is set.
fn remote(method: reqwest::Method, url: &str, query: &[(&str, &str)]) -> ExitCode {
    let mut request = reqwest::blocking::Client::new()
        .request(method, url)
        .query(query);
    if let Some(key) = std::env::var("CHARTBRIDGE_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty())
    {
        request = request.bearer_auth(key);
    }
    let response = request.send();
    match response {
        Ok(r) => {
            let ok = r.status().is_success();
            let body: Value = r.json().unwrap_or(Value::Null);
            print_json(&body);
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            ExitCode::from(2)
        }
    }
}
