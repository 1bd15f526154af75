//! The NV-Hypervisor VMM library, built on the rust-vmm crates. It knows nothing of the NV region
//! layout: it reaches NV only through the `nv-extension` coordinator and its host trait.

pub mod config;
