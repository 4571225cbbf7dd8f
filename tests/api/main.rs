//! End-to-end tests: the real `token-broker` binary, started the way the Functions host
//! starts it, against the real oidc-provider and the Key Vault / managed identity doubles.

mod audit;
mod callers;
mod demo;
mod doubles;
mod errors;
mod faults;
mod fleet;
mod fleet_edges;
mod fleet_shield;
mod functions_host;
mod health;
mod hostile;
mod idp_mtls;
mod invalidation;
mod key_vault;
mod mtls;
mod openapi;
mod opentelemetry;
mod production;
mod rotation;
mod secrecy;
mod secretless;
mod stats;
mod support;
mod tokens;
