//! chartbridge: a FHIR-native mapping gateway. Intake submissions go through declarative mapping
//! files into FHIR R4 QuestionnaireResponses, Observations and Provenance.
//!
//! Layers, imports pointing down only: `cli` → `server` → `http` → `intake`, `inbound`,
//! `workflow`, `delivery` → `mapping` → `fhir`; `store`, `config`, `metrics` and `logging` at
//! the bottom. See ARCHITECTURE.md.

pub mod cli;
pub mod config;
pub mod delivery;
pub mod fetch;
pub mod fhir;
pub mod golden;
pub mod http;
pub mod ids;
pub mod inbound;
pub mod intake;
pub mod logging;
pub mod mapping;
pub mod metrics;
pub mod operations;
pub mod server;
pub mod store;
pub mod workflow;
