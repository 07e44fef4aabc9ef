//! Custodia local stack library: the pieces `src/main.rs` wires together on loopback.
pub mod dev_idp;
pub mod stack;
