//! The local tree: what belongs to it ([`rules`]), reading it ([`scan`], [`hash`]), writing
//! into it without ever leaving it ([`write`]), and the state kept beside it ([`state`]).
//! Blocking code only: callers run it on blocking threads. No network.

pub mod hash;
pub mod rules;
pub mod scan;
pub mod state;
pub mod write;
