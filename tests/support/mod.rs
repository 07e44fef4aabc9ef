//! Shared helpers for the integration tests (each test file uses what it needs).
#![allow(dead_code)]

pub mod browser;
pub mod custodia;
pub mod echo;
pub mod edge_auth;
pub mod http;
pub mod oidc_provider;
pub mod process;
pub mod prometheus;
pub mod raw_tcp;
pub mod stack;
