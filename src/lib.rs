//! chartbridge: a FHIR-native mapping gateway. Intake submissions go through declarative mapping
//! files into FHIR R4 QuestionnaireResponses, Observations and Provenance.
//!
//! Layers, imports pointing down only: `cli` → `mapping` → `fhir`; `store` stands beside
//! `fhir` at the bottom. See ARCHITECTURE.md.

pub mod cli;
pub mod delivery;
pub mod fhir;
pub mod golden;
pub mod mapping;
pub mod store;
