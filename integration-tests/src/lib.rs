//! Shared pieces of the end-to-end tests: the workspace binaries, building the test guests, the
//! KVM gate, guest command lines, serial log helpers, one-shot API requests, and conformance to
//! `docs/openapi.yaml`.
pub mod api_client;
pub mod binaries;
pub mod guests;
pub mod harness;
pub mod openapi;
pub mod process;
