//! Shared pieces of the end-to-end tests: building the test guests, the KVM gate and serial log
//! helpers, and conformance to `docs/openapi.yaml`.
pub mod guests;
pub mod harness;
pub mod openapi;
