//! Pieces shared by the integration tests of this crate.

use nv_extension::{HostError, NvHost};
use vm_memory::VolatileSlice;

/// A host with nothing to pause or flush whose volatile state is a fixed blob chosen by the test.
pub struct BlobHost(pub Vec<u8>);

impl NvHost for BlobHost {
    fn pause_vcpus(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn quiesce_devices(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn guest_memory_ranges(&self) -> Vec<VolatileSlice<'_>> {
        Vec::new()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(self.0.clone())
    }
    fn resume(&mut self) -> Result<(), HostError> {
        Ok(())
    }
}
