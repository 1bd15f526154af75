//! placeholder
pub mod guests;
