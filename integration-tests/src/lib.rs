//! Shared pieces of the end-to-end tests: the workspace binaries, building the test guests, the
//! KVM gate and the guest TSC rate, guest command lines, serial log helpers, the VMM process
//! harness, a minimal VMM on kvm-ioctls, the netkv guest's load client, network namespaces, one-shot API requests, and conformance to `docs/openapi.yaml` (from `api_client`).
pub mod api_client;
pub mod binaries;
pub mod guests;
pub mod hang_report;
pub mod harness;
pub mod minimal_vm;
pub mod netkv_client;
pub mod netns;
pub mod process;
pub mod tsc;

pub use ::api_client::openapi;
