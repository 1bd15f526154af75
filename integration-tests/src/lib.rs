//! placeholder
pub mod guests;
pub mod harness;
