//! Shared helpers for the integration tests (each test file uses what it needs).
#![allow(dead_code)]

pub mod custodia;
pub mod echo;
pub mod oidc_provider;
pub mod process;
